"""RAHF (docs/methods.md §2.26): make a model preference-aware (SCIT or Dual), take the hidden-state
difference its preferred and dispreferred modes make on the same response, and fit a peft LoRA so
the plain model's hidden states move by alpha times that difference (ao.rahf_loss).

Steps [0, stage1_steps) are stage 1, the rest stage 2, so the trainer's time budget covers both.
Layer ids are Hugging Face `hidden_states` indices: l is the output of block l-1 (0, the
embeddings, is refused; l = num_layers is the final-normed output). Response positions are the
positions that predict the response tokens (the prompt's last character through the last answer
character), the same columns as the trainer's logits; every variant of a prompt left-pads to its
own width and right-pads the same response, so those columns line up from the right.

run.policy stays the plain architecture: in stage 2 the LoRA lives in a peft copy (`self.peft`,
its base frozen) and after every update its merged weights (base + peft's delta) are written into
run.policy, which the trainer samples from, evaluates and saves. The adapter's own state (the peft
model with its base, and its optimiser) travels in the checkpoint's loop tensors for resume.
"""

from __future__ import annotations

import copy
import dataclasses

import peft
import torch
from peft.tuners.lora import LoraLayer

import alignops as ao
from alignops.train import checkpoint as ckpt
from alignops.train.loops.base import DataLoop, Run

VARIANTS = ("scit", "dual")
RESPONSES = ("preferred", "dispreferred", "both")
DIGITS = "0123456789"


@dataclasses.dataclass
class RAHFOptions:
    variant: str = "scit"                 # scit: one model, contrastive instructions; dual: a good and a bad SFT copy
    stage1_steps: int = 10                # loop steps of stage 1 (counted in the budget); the rest are stage 2
    stage1_learning_rate: float = 1e-4    # stage 1's full fine-tune (the SFT loops' rate); stage 2 uses cfg's
    contrast_weight: float = 1.0          # SCIT: weight of the HIR contrast between the two instructions
    contrast_epsilon: float = 0.2         # SCIT: the contrast's label smoothing (the authors' 0.2)
    good_instruction: str = "++ "         # p+ and p-, prepended to the prompt (the task's alphabet only)
    bad_instruction: str = "-- "
    layers: list[int] | None = None       # hidden_states indices; None: all but the embeddings
    alpha: float = 5.0                    # target h_base + alpha * v
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    responses: str = "both"               # stage 2 responses y: preferred, dispreferred, or both (the code's "all")
    batch_size: int = 32                  # prompts per step

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.responses not in RESPONSES:
            raise ValueError(f"responses must be one of {RESPONSES}, got {self.responses!r}")
        for name in ("stage1_steps",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha", "stage1_learning_rate", "contrast_weight", "lora_alpha"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.contrast_epsilon < 0.5:
            raise ValueError(f"contrast_epsilon must be in [0, 0.5), got {self.contrast_epsilon}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.good_instruction or self.good_instruction == self.bad_instruction or not self.bad_instruction:
            raise ValueError(f"good_instruction and bad_instruction must be two different non-empty strings, got "
                             f"{self.good_instruction!r} and {self.bad_instruction!r}")
        if self.layers is not None and (not self.layers or any(not isinstance(l, int) or isinstance(l, bool)
                                                               or l < 1 for l in self.layers)):
            raise ValueError(f"layers must be a non-empty list of hidden_states indices >= 1 "
                             f"(0 is the embeddings), got {self.layers}")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets}")


def wrong_answer(answer: str, rng) -> str:
    """The answer with one digit replaced by a different digit (a 0 appended when it has none)."""
    spots = [i for i, c in enumerate(answer) if c in DIGITS]
    if not spots:
        return answer + "0"
    i = spots[rng.randrange(len(spots))]
    return answer[:i] + rng.choice([d for d in DIGITS if d != answer[i]]) + answer[i + 1:]


def clipped_step(model, opt, loss, lr: float, max_grad_norm: float) -> float:
    """One AdamW step of `loss` at `lr` with gradient clipping; the gradient norm."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    opt.step()
    return grad_norm


class RAHFLoop(DataLoop):
    """RAHF-SCIT / RAHF-Dual on the task's prompts: preferred = the expert answer, dispreferred =
    the policy's own wrong sample (or, when its sample is right, the answer with one digit changed)."""

    Options = RAHFOptions

    def __init__(self, run: Run, options: RAHFOptions):
        super().__init__(run, options)
        cfg, o = run.cfg, options
        num_layers = run.policy.config.num_hidden_layers
        self.layers = list(o.layers) if o.layers is not None else list(range(1, num_layers + 1))
        if max(self.layers) > num_layers:
            raise ValueError(f"method {cfg.method!r}: layers must be hidden_states indices in [1, {num_layers}] "
                             f"for this {num_layers}-block model, got {self.layers}")
        alphabet = set(run.task.alphabet)
        for name in ("good_instruction", "bad_instruction"):
            if not set(getattr(o, name)) <= alphabet:
                raise ValueError(f"method {cfg.method!r}: {name} {getattr(o, name)!r} uses characters outside the "
                                 f"task's alphabet {run.task.alphabet!r}")
        self.good = self.bad = self.good_opt = self.bad_opt = None
        if o.variant == "dual":  # two SFT copies of the base; the LoRA then goes on the untouched base
            self.good, self.bad = copy.deepcopy(run.policy), copy.deepcopy(run.policy)
            self.good_opt, self.bad_opt = (torch.optim.AdamW(m.parameters(), lr=o.stage1_learning_rate,
                                                             weight_decay=cfg.weight_decay)
                                           for m in (self.good, self.bad))
        self.peft = self.lora_opt = None
        self._build_adapter()  # also checks the LoRA options before training (peft rejects unknown targets)
        self.adapter_on_stage1_model = o.variant == "dual" or o.stage1_steps == 0

    # ---- the adapter

    def _build_adapter(self) -> None:
        """A peft LoRA on a copy of run.policy (its base frozen), with its own AdamW."""
        o = self.opts
        config = peft.LoraConfig(r=o.lora_rank, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                                 target_modules=list(o.lora_targets), bias="none", task_type="CAUSAL_LM",
                                 layers_to_transform=list(range(max(self.layers))))
        with torch.random.fork_rng(devices=[]):  # LoRA's init draws nothing from the run's RNG stream
            torch.manual_seed(self.run.cfg.seed)
            try:
                self.peft = peft.get_peft_model(copy.deepcopy(self.run.policy), config)
            except ValueError as e:
                raise ValueError(f"method {self.run.cfg.method!r}: lora_targets {o.lora_targets}: {e}") from None
        self.lora_opt = torch.optim.AdamW([p for p in self.peft.parameters() if p.requires_grad],
                                          lr=self.run.cfg.learning_rate, weight_decay=0.0)

    @torch.no_grad()
    def sync_policy(self) -> None:
        """run.policy <- the merged weights (base + peft's LoRA delta) of the adapted model."""
        inner = self.peft.get_base_model()
        for name, module in self.run.policy.named_modules():
            twin = inner.get_submodule(name)
            if isinstance(twin, LoraLayer):
                base = twin.get_base_layer()
                merged = base.weight + twin.get_delta_weight(twin.active_adapters[0])
                module.weight.copy_(merged.to(module.weight.dtype))

    # ---- data

    def pairs(self, step: int) -> tuple[list, list[str], list[str], dict]:
        """The step's problems with their preferred and dispreferred responses, and the reward of
        the policy's own samples (one per prompt, at the trainer's temperature)."""
        run = self.run
        problems = run.task.sample(run.rng, self.opts.batch_size)
        with_steps = run.task.with_steps()
        _, samples = run.sample([p.prompt for p in problems], 1)
        rewards = [run.task.reward(p, s) for p, s in zip(problems, samples)]
        preferred = [p.expert_completion(with_steps) for p in problems]
        dispreferred = [s if r < 1 else wrong_answer(p.answer if not with_steps else w, run.rng)
                        for p, s, r, w in zip(problems, samples, rewards, preferred)]
        return problems, preferred, dispreferred, {"reward": sum(rewards) / len(rewards)}

    def instructed(self, prompts: list[str], good: bool) -> list[str]:
        return [(self.opts.good_instruction if good else self.opts.bad_instruction) + p for p in prompts]

    def sequence_nll(self, batch, model) -> torch.Tensor:
        """Token-mean NLL of each row's response [B] (with autograd)."""
        logp = self.run.token_logprobs(batch, model)
        return -logp.sum(-1) / batch.completion_mask.sum(-1).clamp(min=1)

    # ---- stage 1

    def stage1(self, step: int) -> dict:
        run, o, cfg = self.run, self.opts, self.run.cfg
        problems, preferred, dispreferred, metrics = self.pairs(step)
        prompts = [p.prompt for p in problems]
        lr = o.stage1_learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if o.variant == "dual":
            good = run.teacher_batch(prompts, preferred)
            bad = run.teacher_batch(prompts, dispreferred)
            good_loss = self.token_nll(good, self.good)
            bad_loss = self.token_nll(bad, self.bad)
            return {**metrics, "stage": 1, "rahf/good_nll": float(good_loss.detach()),
                    "rahf/bad_nll": float(bad_loss.detach()),
                    "grad_norm": clipped_step(self.good, self.good_opt, good_loss, lr, cfg.max_grad_norm),
                    "rahf/bad_grad_norm": clipped_step(self.bad, self.bad_opt, bad_loss, lr, cfg.max_grad_norm)}
        # SCIT (HIR): NLL of each response under its own instruction, plus a 2-way contrast of its
        # likelihood under its own against the opposite instruction, label-smoothed by epsilon
        responses = preferred + dispreferred
        matched = run.teacher_batch(self.instructed(prompts, True) + self.instructed(prompts, False), responses)
        opposite = run.teacher_batch(self.instructed(prompts, False) + self.instructed(prompts, True), responses)
        logp = run.token_logprobs(matched)
        nll = -logp.sum() / matched.completion_mask.sum()
        own = logp.sum(-1) / matched.completion_mask.sum(-1)  # per-row token-mean log-likelihood
        other = -self.sequence_nll(opposite, run.policy)
        log_share = torch.log_softmax(torch.stack([own, other], -1), -1)
        contrast = -((1 - o.contrast_epsilon) * log_share[:, 0] + o.contrast_epsilon * log_share[:, 1]).mean()
        loss = nll + o.contrast_weight * contrast
        grad_norm = clipped_step(run.policy, run.opt, loss, lr, cfg.max_grad_norm)
        return {**metrics, "stage": 1, "loss": float(loss.detach()), "rahf/nll": float(nll.detach()),
                "rahf/contrast": float(contrast.detach()), "grad_norm": grad_norm,
                "rahf/own_share": float(log_share[:, 0].detach().exp().mean())}

    def token_nll(self, batch, model) -> torch.Tensor:
        """Token-mean NLL over the batch's response tokens (ao's SFT loss on `model`'s logits)."""
        head = self.run.head(batch, model)
        labels = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
        if head.logits is not None:
            return ao.sft_loss(head.logits, labels, backend=self.run.cfg.backend).loss
        return ao.fused_linear_sft_loss(head.hidden, head.weight, labels, bias=head.bias, softcap=head.softcap,
                                        logit_scale=head.logit_scale, backend=self.run.cfg.backend).loss

    # ---- stage 2

    def hidden(self, model, batch) -> torch.Tensor:
        """hidden_states[l] at the response positions for l in self.layers: [L, B, T, H]."""
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids(), output_hidden_states=True, use_cache=False)
        P, T = batch.prompt_len, batch.completion_ids.shape[1]
        return torch.stack([out.hidden_states[l][:, P - 1:P - 1 + T] for l in self.layers])

    @torch.no_grad()
    def directions(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """v [L, B, T, H] on (prompt, response): SCIT: the preference-aware model (the adapter's
        base) under p+ minus under p-; Dual: the good copy minus the bad copy, no instruction.
        Returns (v, the response mask [B, T])."""
        run = self.run
        plain = run.teacher_batch(prompts, responses)
        if self.opts.variant == "dual":
            self.good.eval(), self.bad.eval()
            return self.hidden(self.good, plain) - self.hidden(self.bad, plain), plain.completion_mask
        self.peft.eval()
        with self.peft.disable_adapter():
            pos = self.hidden(self.peft, run.teacher_batch(self.instructed(prompts, True), responses))
            neg = self.hidden(self.peft, run.teacher_batch(self.instructed(prompts, False), responses))
        return pos - neg, plain.completion_mask

    def stage2_loss(self, prompts: list[str], responses: list[str]):
        """ao.rahf_loss of the adapted model on (prompt, response), no instruction, against the
        base's hidden states + alpha v; the PreferenceOutput and the mean |v|."""
        plain = self.run.teacher_batch(prompts, responses)
        v, mask = self.directions(prompts, responses)
        self.peft.eval()
        with torch.no_grad(), self.peft.disable_adapter():
            base = self.hidden(self.peft, plain)
        self.peft.train()
        lora = self.hidden(self.peft, plain)
        out = ao.rahf_loss(lora, base, v, mask=mask, alpha=self.opts.alpha)
        v_norm = (torch.linalg.vector_norm(v, dim=-1) * mask).sum() / (mask.sum() * v.shape[0]).clamp(min=1)
        return out, float(v_norm)

    def stage2(self, step: int) -> dict:
        run, o = self.run, self.opts
        if not self.adapter_on_stage1_model:  # SCIT: the LoRA goes on the model stage 1 made
            self._build_adapter()
            self.adapter_on_stage1_model = True
        problems, preferred, dispreferred, metrics = self.pairs(step)
        prompts = [p.prompt for p in problems]
        responses = {"preferred": preferred, "dispreferred": dispreferred, "both": preferred + dispreferred}[o.responses]
        prompts = prompts * (2 if o.responses == "both" else 1)
        out, v_norm = self.stage2_loss(prompts, responses)
        grad_norm = clipped_step(self.peft, self.lora_opt, out.loss, run.cfg.learning_rate, run.cfg.max_grad_norm)
        self.sync_policy()
        return {**metrics, "stage": 2, "loss": float(out.loss.detach()), "rahf/loss": float(out.loss.detach()),
                **{f"rahf/layer{l}": float(x) for l, x in zip(self.layers, out.losses.detach())},
                "rahf/direction_norm": v_norm, "grad_norm": grad_norm}

    def step(self, step: int) -> dict:
        return self.stage1(step) if step < self.opts.stage1_steps else self.stage2(step)

    # ---- checkpoint

    def _models(self) -> dict:
        models = {}
        if self.opts.variant == "dual":
            models.update(good=(self.good, self.good_opt), bad=(self.bad, self.bad_opt))
        if self.adapter_on_stage1_model:
            models["lora"] = (self.peft, self.lora_opt)
        return models

    def state_dict(self) -> dict:
        return {"adapter_on_stage1_model": self.adapter_on_stage1_model,
                "optimizers": {name: ckpt.optimizer_tensors(opt)[1] for name, (_, opt) in self._models().items()}}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        files = {}
        for name, (model, opt) in self._models().items():
            files[name] = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            files[f"{name}_optim"] = ckpt.optimizer_tensors(opt)[0]
        return files

    def load_state_dict(self, state: dict, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        if state["adapter_on_stage1_model"] and not self.adapter_on_stage1_model:
            self._build_adapter()
        self.adapter_on_stage1_model = state["adapter_on_stage1_model"]
        for name, (model, opt) in self._models().items():
            model.load_state_dict(tensors[name])
            ckpt.load_optimizer(opt, tensors[f"{name}_optim"], state["optimizers"][name])
