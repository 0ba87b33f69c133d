"""On-policy distillation (docs/methods.md §2.46; Agarwal et al.'s GKD with lambda = 1, the
"on-policy distillation" recipe of Qwen3 and of Thinking Machines): the student samples
completions of the task's prompts, a larger teacher scores every sampled position, and the student
descends the per-token divergence between its next-token distribution and the teacher's over the
whole vocabulary, reverse KL(student || teacher) by default, at the completion positions only
(prompt and padding masked). No reward enters the loss; the sampled accuracy is logged.

The teacher is built like the SFT base (model.build_policy of the same task and arch), larger
(`teacher_hidden_size`, `teacher_num_layers`), and trained by SFT on the task's expert answers
(warmup.sft_warmup) until its held-out probe accuracy reaches `teacher_target`. It is cached in
`teacher_dir` (a checkpoint, like runs/base), so a second run loads it; a cached teacher of another
task, arch or size, or one below the target, is an error naming the option, never silently reused.

With the fused lm_head (the default) the loss is ao.fused_linear_distill_loss from both models'
last hidden states and lm_head weights, so neither [tokens, vocab] logits tensor is formed;
--fused_lm_head false computes ao.distill_loss from the two logits.
"""

from __future__ import annotations

import dataclasses
import os

import torch

import alignops as ao
from alignops.distill import DIVERGENCES
from alignops.train import checkpoint as ckpt
from alignops.train.evaluate import evaluate
from alignops.train.loops.base import DataLoop, labels
from alignops.train.model import build_policy
from alignops.train.rollout import sequence_head

TEACHER_KIND = "sft_teacher"


@dataclasses.dataclass
class OnPolicyDistillOptions:
    divergence: str = "reverse_kl"         # reverse_kl (on-policy distillation), forward_kl, jsd
    beta: float = 0.5                      # jsd's mixture weight (0: forward KL, 1: reverse KL); unused otherwise
    K: int | None = None                   # samples per prompt (None: cfg.num_generations)
    teacher_dir: str = "runs/teacher"      # the teacher's checkpoint: loaded if there, else trained and saved there
    teacher_hidden_size: int = 256         # the teacher: the base's architecture, larger (base: 128 x 3 layers)
    teacher_num_layers: int = 4
    teacher_target: float = 0.9            # its SFT stops at the first probe (200 held-out problems) >= this
    teacher_sft_steps: int = 4000          # its SFT step cap (below the target then: an error)
    teacher_lr: float = 1e-3               # its SFT learning rate (constant after 50 warm-up steps)

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        for name in ("K", "teacher_hidden_size", "teacher_num_layers", "teacher_sft_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        heads = teacher_heads(self.teacher_hidden_size)
        if self.teacher_hidden_size % heads:
            raise ValueError(f"teacher_hidden_size must be a multiple of its {heads} attention heads "
                             f"(hidden_size // 32), got {self.teacher_hidden_size}")
        if not 0.0 < self.teacher_target <= 1.0:
            raise ValueError(f"teacher_target must lie in (0, 1], got {self.teacher_target}")
        if not self.teacher_lr > 0:
            raise ValueError(f"teacher_lr must be > 0, got {self.teacher_lr}")
        if not self.teacher_dir:
            raise ValueError("teacher_dir must be a directory path")


def teacher_heads(hidden: int) -> int:
    return max(1, hidden // 32)  # as trainer.setup builds the base


def teacher_config(cfg, opts: OnPolicyDistillOptions):
    """The TrainConfig the teacher is built and trained with: the run's, at the teacher's size."""
    return dataclasses.replace(cfg, hidden_size=opts.teacher_hidden_size, num_layers=opts.teacher_num_layers,
                               init_from="none", model=None, output_dir=None, resume=False, loop_kwargs={})


def _identity(cfg, opts) -> dict:
    return {"task": cfg.task, "arch": cfg.arch, "hidden_size": opts.teacher_hidden_size,
            "num_layers": opts.teacher_num_layers}


def load_or_train_teacher(cfg, opts: OnPolicyDistillOptions, vocab_size: int) -> tuple[torch.nn.Module, dict]:
    """(the frozen teacher, its record): loaded from opts.teacher_dir when a teacher checkpoint of
    this task, arch and size is there, else trained by SFT and saved there first."""
    from alignops.train.warmup import IN_BAND, sft_warmup  # noqa: PLC0415 - warmup imports the trainer

    tcfg = teacher_config(cfg, opts)
    want = _identity(cfg, opts)
    where = opts.teacher_dir
    if ckpt.is_checkpoint(where):
        info = ckpt.load_state(where)
        have = {k: info.get(k) for k in want}
        if info.get("kind") != TEACHER_KIND or have != want:
            raise ValueError(f"teacher_dir {where!r} holds a checkpoint of {info.get('kind')} {have}, not the "
                             f"teacher this run asks for {want}: pass another --loop_kwargs teacher_dir, or "
                             f"delete that directory to train a new teacher there")
    elif os.path.lexists(where):
        raise ValueError(f"teacher_dir {where!r} exists but is not a checkpoint: pass another teacher_dir")
    else:
        info = sft_warmup(tcfg, target_accuracy=(opts.teacher_target, 1.0), max_steps=opts.teacher_sft_steps,
                          min_steps=min(100, opts.teacher_sft_steps), eval_every=25, lr=opts.teacher_lr,
                          out_dir=where, kind=TEACHER_KIND,
                          extra={"hidden_size": opts.teacher_hidden_size, "num_layers": opts.teacher_num_layers})
    if info.get("outcome") != IN_BAND or info.get("probe_accuracy") is None \
            or info["probe_accuracy"] < opts.teacher_target:
        raise ValueError(f"the teacher in {where!r} reached probe accuracy {info.get('probe_accuracy')} after "
                         f"{info.get('steps')} SFT steps ({info.get('outcome')}), below teacher_target "
                         f"{opts.teacher_target}: delete {where!r} and raise teacher_sft_steps (or teacher_lr), "
                         f"or lower teacher_target")
    teacher = build_policy(vocab_size, None, tcfg.arch, seed=tcfg.seed, hidden=tcfg.hidden_size,
                           layers=tcfg.num_layers, heads=teacher_heads(tcfg.hidden_size)).to(cfg.device)
    ckpt.load_model_weights(where, teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, info


def distill_batch_loss(cfg, student, teacher, batch, divergence: str = "reverse_kl", beta: float = 0.5):
    """ao.DistillOutput of the student's divergence from the teacher at every completion position
    of `batch` (padding after EOS masked; the prompt is not a completion position), over the full
    vocabulary, both distributions at cfg.temperature, token-mean; with autograd to the student."""
    s = sequence_head(student, batch, cfg.fused_lm_head)
    with torch.no_grad():
        t = sequence_head(teacher, batch, cfg.fused_lm_head)
    kw = dict(divergence=divergence, beta=beta, temperature=cfg.temperature, agg="token-mean", backend=cfg.backend)
    if s.logits is not None:
        return ao.distill_loss(s.logits, t.logits, labels(batch), **kw)
    return ao.fused_linear_distill_loss(s.hidden, s.weight, t.hidden, t.weight, labels(batch), student_bias=s.bias,
                                        teacher_bias=t.bias, softcap=s.softcap, logit_scale=s.logit_scale,
                                        teacher_softcap=t.softcap, teacher_logit_scale=t.logit_scale, **kw)


class OnPolicyDistillLoop(DataLoop):
    """Each step: num_prompts problems, K student samples each at cfg.temperature, one optimiser
    step on the teacher-scored divergence of the sampled completions."""

    Options = OnPolicyDistillOptions

    def __init__(self, run, options):
        super().__init__(run, options)
        cfg = run.cfg
        if cfg.model:
            raise ValueError("method 'on_policy_distill' builds its teacher like the tiny base; with --model the "
                             "student is a checkpoint of another architecture, which it does not support")
        if not cfg.temperature > 0:
            raise ValueError(f"--temperature must be > 0 for on-policy distillation (the student samples and both "
                             f"distributions are softmax(logits / temperature)), got {cfg.temperature}")
        self.teacher, self.teacher_info = load_or_train_teacher(cfg, options, run.tok.vocab_size)
        self.teacher_accuracy = evaluate(self.teacher, run.task, run.tok, cfg.eval_size, cfg.max_completion_length)

    def step(self, step: int) -> dict:
        run, opts = self.run, self.opts
        K = opts.K or run.cfg.num_generations
        problems = run.task.sample(run.rng, run.cfg.num_prompts)
        batch, texts = run.sample([p.prompt for p in problems], K)
        rows = [p for p in problems for _ in range(K)]
        rewards, reward_metrics = run.reward_model(run.task, rows, texts)
        correct = [run.task.reward(p, t) > 0 for p, t in zip(rows, texts)]
        out = distill_batch_loss(run.cfg, run.policy, self.teacher, batch, opts.divergence, opts.beta)
        update = run.optimizer_step(out.loss, step)
        return {"reward": float(torch.tensor(rewards, dtype=torch.float32).mean()), **reward_metrics,
                "accuracy": sum(correct) / len(correct), "completions/mean_length": float(batch.lengths.mean()),
                **{k: float(v) for k, v in out.metrics.items()}, **update}

    def evaluate(self) -> dict:
        return {**self.run.evaluate(), "eval/teacher_accuracy": self.teacher_accuracy}

    def state_dict(self) -> dict:
        return {"teacher": {**_identity(self.run.cfg, self.opts), "dir": self.opts.teacher_dir,
                            "steps": self.teacher_info.get("steps")}}

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        now = self.state_dict()["teacher"]
        if state.get("teacher") != now:
            raise ValueError(f"the run was trained with the teacher {state.get('teacher')}; this resume loads "
                             f"{now}: resume with the same teacher_dir and teacher")
