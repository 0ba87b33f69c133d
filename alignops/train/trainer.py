"""The RL loop, top to bottom: rollout -> rewards -> advantages -> epochs x mini-batches of the
fused policy loss -> AdamW -> metrics. Methods differ only through their preset (presets.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time

import torch

import alignops as ao
from alignops.reference import policy_loss as _ref
from alignops.train import checkpoint as ckpt
from alignops.train.config import TrainConfig
from alignops.train.model import build_policy, frozen_copy
from alignops.train.rewards import RewardModel
from alignops.train.rollout import Batch, concat_batches, generate
from alignops.train.tasks import make_task
from alignops.train.tokenizer import CharTokenizer


# --------------------------------------------------------------------------------------------
# pieces the loop and the SFT warm-up share


def setup(cfg: TrainConfig):
    task = make_task(cfg.task)
    tok = CharTokenizer(task.alphabet)
    policy = build_policy(tok.vocab_size, cfg.model, cfg.arch, seed=cfg.seed, hidden=cfg.hidden_size,
                          layers=cfg.num_layers, heads=max(1, cfg.hidden_size // 32)).to(cfg.device)
    return task, tok, policy


def sequence_logits(model, batch: Batch) -> torch.Tensor:
    """Logits that predict the completion tokens: [B, T, V], a strided view (no copy)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids(), use_cache=False)
    return out.logits[:, batch.prompt_len - 1:-1]


@torch.no_grad()
def completion_logprobs(model, batch: Batch, temperature: float, backend=None) -> torch.Tensor:
    labels = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
    return ao.token_logprobs(sequence_logits(model, batch), labels, temperature=temperature, backend=backend)


@torch.no_grad()
def evaluate(model, task, tok, size: int, max_new_tokens: int, batch_size: int = 500, samples: int = 0,
             temperature: float = 1.0) -> float:
    """Accuracy on the task's fixed held-out problems (the same set for every method): greedy
    decoding, or with `samples` = k > 0 the mean over k samples per problem at `temperature`
    (verl's mean@k, an estimate of pass@1 of the sampling policy RL optimises), drawn from a fixed
    seed so every method and step sees the same sampling noise."""
    problems = task.heldout[:size]
    if samples:
        problems = [p for p in problems for _ in range(samples)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(1234)
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        b = generate(model, [tok.encode(p.prompt, bos=True) for p in chunk], max_new_tokens=max_new_tokens,
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=temperature if samples else 0.0,
                     generator=generator)
        correct += sum(task.reward(p, tok.decode(ids)) for p, ids in zip(chunk, b.completion_ids))
    return correct / max(1, len(problems))


def evaluation(cfg, model, task, tok) -> dict:
    out = {"eval/accuracy": evaluate(model, task, tok, cfg.eval_size, cfg.max_completion_length)}
    if cfg.eval_samples:
        out[f"eval/mean@{cfg.eval_samples}"] = evaluate(model, task, tok, cfg.eval_size, cfg.max_completion_length,
                                                        samples=cfg.eval_samples, temperature=cfg.temperature)
    return out


def normalizer_for(agg: str, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """The aggregation's denominator over one optimiser step (docs/methods.md §00.2): the library's own
    default normaliser (alignops.reference.policy_loss.default_normalizer) applied to the whole
    step's mask, so a micro-batched step divides by exactly what one big call would: the token
    count for token-mean, the count of non-empty rows for the seq-mean modes, non-empty rows x
    max_len for seq-mean-token-sum-norm (empty rows are never counted)."""
    valid = mask != 0
    return _ref.default_normalizer(agg, valid, _ref.Rows(valid.shape, valid.device), max_len, torch.float32)


def critic_agg(cfg) -> str:
    """The value loss's aggregation: the actor's mode (verl aggregates the critic with the actor's
    loss_agg_mode; ORZ averages per sequence, docs/methods.md §2.3), so orz's critic is
    seq-mean-token-mean like its actor, the token-mean presets' critics token-mean."""
    return cfg.loss_type


def critic_normalizer(cfg, mask: torch.Tensor) -> torch.Tensor:
    """The critic's own denominator over its optimiser step: critic_agg's, from the critic's mask."""
    return normalizer_for(critic_agg(cfg), mask, cfg.max_completion_length)


class MetricLog:
    def __init__(self, path: str | None, resume: bool):
        self.path, self.rows = path, []
        if path and resume and os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if line.strip()]
            for i, line in enumerate(lines):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise
                    # the last row, torn by a crash mid-append: dropped (truncate rewrites the file)
        elif path:
            open(path, "w").close()

    def add(self, row: dict) -> None:
        row = {k: (round(float(v), 6) if isinstance(v, (float, torch.Tensor)) else v) for k, v in row.items()}
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> None:
        """On resume: forget rows the interrupted run logged after its last checkpoint."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        if self.path:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)


def plot_curves(rows: list[dict], path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    train_rows = [r for r in rows if "reward" in r]
    ax[0].plot([r["step"] for r in train_rows], [r["reward"] for r in train_rows], lw=0.6, alpha=0.5, label="per step")
    avg = moving_average([r["reward"] for r in train_rows], 25)
    ax[0].plot([r["step"] for r in train_rows], avg, lw=1.5, label="mean of 25 steps")
    ax[0].set(xlabel="step", ylabel="mean reward", title=f"{title}: training reward")
    ax[0].legend(fontsize=7)
    ev = [r for r in rows if "eval/accuracy" in r]
    ax[1].plot([r["step"] for r in ev], [100 * r["eval/accuracy"] for r in ev], marker="o", label="greedy")
    for key in sorted({k for r in ev for k in r if k.startswith("eval/mean@")}):
        pts = [r for r in ev if key in r]
        ax[1].plot([r["step"] for r in pts], [100 * r[key] for r in pts], marker="s", label=key.split("/")[1])
    ax[1].set(xlabel="step", ylabel="held-out accuracy (%)", title="held-out accuracy")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def moving_average(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # noqa: PLC0415
    return tqdm(iterable, **kw)


# --------------------------------------------------------------------------------------------
# SFT warm-up: the shared starting policy ("base model") of every method


def sft_warmup(cfg: TrainConfig, steps: int = 1200, batch_size: int = 64, lr: float = 3e-3,
               time_budget_s: float | None = None, out_dir: str = "runs/base", warmup_steps: int = 50) -> dict:
    """A fixed number of steps (the base does not depend on the machine's speed) with linear
    warm-up and cosine decay to 0. Measured on the default task and model: 1000 steps give 11 %
    held-out greedy accuracy, 1200 give 50 %, 1400 give 99 % (the model learns addition in a jump).
    The default 1200 leaves an imperfect base whose sampled groups mostly hold both right and
    wrong answers (about 80 % of groups of 8), the regime RL methods are built for."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task, tok, policy = setup(cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    with_steps = task.with_steps()
    t0, step = time.time(), 0
    bar = progress(range(steps), cfg.progress, desc="sft warm-up")
    for step in bar:
        problems = task.sample(rng, batch_size)
        seqs = [tok.encode(p.prompt, bos=True) + tok.encode(p.expert_completion(with_steps), eos=True)
                for p in problems]
        plen = [len(tok.encode(p.prompt, bos=True)) for p in problems]
        L = max(map(len, seqs))
        ids = torch.full((batch_size, L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, L), -100, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, plen)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, p - 1:len(s) - 1] = torch.tensor(s[p:])  # predict the completion only
        ids, labels = ids.to(cfg.device), labels.to(cfg.device)
        logits = policy(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits
        logp = ao.token_logprobs(logits, labels, backend=cfg.backend)
        loss = -logp.sum() / (labels != -100).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cfg.progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if time_budget_s and time.time() - t0 > time_budget_s:
            break
    acc = evaluate(policy, task, tok, cfg.eval_size, cfg.max_completion_length)
    info = {"kind": "sft_base", "steps": step + 1, "seconds": round(time.time() - t0, 1),
            "heldout_accuracy": acc, "task": cfg.task, "arch": cfg.arch, "seed": cfg.seed}
    ckpt.save_checkpoint(out_dir, policy, state=info, tokenizer=tok)
    return info


# --------------------------------------------------------------------------------------------
# rollouts


@dataclasses.dataclass
class Rollout:
    """One step's sampled groups: each prompt repeated num_generations times, consecutively."""

    problems: list
    batch: Batch
    texts: list[str]
    rewards: torch.Tensor   # [B] the reward functions' total (metrics, group filtering)
    correct: torch.Tensor   # [B] bool: the task's verifier accepts the completion
    metrics: dict = dataclasses.field(default_factory=dict)
    scores: torch.Tensor | None = None  # [B] what the advantages see: rewards + overlong shaping

    def select(self, rows: torch.Tensor) -> "Rollout":
        idx = rows.tolist()
        return Rollout([self.problems[i] for i in idx], self.batch.select(rows), [self.texts[i] for i in idx],
                       self.rewards[rows], self.correct[rows], dict(self.metrics),
                       None if self.scores is None else self.scores[rows])


def score_completions(cfg, task, reward_model, problems, texts, truncated: torch.Tensor):
    """(rewards [B], correct [B] bool, metrics): the reward functions' weighted total, with the
    truncation reward where set; `correct` is the task verifier's verdict (reused from the
    `accuracy` reward function when it is one of them, so the verifier runs once)."""
    per_function = reward_model.score(task, problems, texts)
    totals, metrics = reward_model.combine(per_function)
    verdicts = per_function.get("accuracy") or [task.reward(p, t) for p, t in zip(problems, texts)]
    rewards = torch.tensor(totals, dtype=torch.float32, device=truncated.device)
    if cfg.truncation_reward is not None:
        rewards = torch.where(truncated, torch.full_like(rewards, cfg.truncation_reward), rewards)
    return rewards, torch.tensor([v > 0 for v in verdicts], device=truncated.device), metrics


def sample_groups(cfg, task, tok, policy, reward_model, rng, generator) -> Rollout:
    problems = task.sample(rng, cfg.num_prompts)
    group = [p for p in problems for _ in range(cfg.num_generations)]
    batch = generate(policy, [tok.encode(p.prompt, bos=True) for p in group],
                     max_new_tokens=cfg.max_completion_length, eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                     generator=generator)
    texts = [tok.decode(ids) for ids in batch.completion_ids]
    rewards, correct, metrics = score_completions(cfg, task, reward_model, group, texts, batch.truncated)
    return Rollout(group, batch, texts, rewards, correct, metrics)


def _cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    return Rollout([p for r in parts for p in r.problems], concat_batches([r.batch for r in parts], pad_id),
                   [t for r in parts for t in r.texts], torch.cat([r.rewards for r in parts]),
                   torch.cat([r.correct for r in parts]), dict(parts[0].metrics))


def collect_rollouts(cfg, task, tok, policy, reward_model, rng, generator) -> Rollout:
    """One generation round; or, with dynamic sampling (DAPO, DLER), rounds until num_prompts groups
    whose rewards differ are collected (exactly num_prompts kept); or, with threshold resampling
    (GPG's beta_th), rounds until that share of the batch is such groups, the rest filled with
    the others. Overlong shaping is added to the scores after filtering (filters judge rewards)."""
    G = cfg.num_generations
    filtering = cfg.dynamic_sampling or cfg.min_valid_group_fraction > 0
    parts = [sample_groups(cfg, task, tok, policy, reward_model, rng, generator)]
    if filtering:
        need = cfg.num_prompts if cfg.dynamic_sampling else math.ceil(cfg.min_valid_group_fraction * cfg.num_prompts)
        valid, invalid = [], []
        while True:
            r = parts[-1].rewards.view(-1, G)
            varied = (r.max(-1).values > r.min(-1).values).tolist()
            base = (len(parts) - 1) * cfg.num_prompts
            for g, ok in enumerate(varied):
                (valid if ok else invalid).append(base + g)
            if len(valid) >= need:
                break
            if 0 < cfg.max_num_gen_batches <= len(parts):
                if cfg.dynamic_sampling:
                    raise RuntimeError(
                        f"dynamic sampling found {len(valid)} of {cfg.num_prompts} groups with differing rewards "
                        f"in {len(parts)} generation rounds (max_num_gen_batches): the policy solves every "
                        "prompt or none; raise max_num_gen_batches or turn dynamic_sampling off")
                break
            parts.append(sample_groups(cfg, task, tok, policy, reward_model, rng, generator))
        keep = valid[:cfg.num_prompts]
        if not cfg.dynamic_sampling:
            keep += invalid[:cfg.num_prompts - len(keep)]
        rows = torch.tensor([g * G + j for g in keep for j in range(G)])
        generated = len(parts) * cfg.num_prompts
        rollout = _cat_rollouts(parts, tok.pad_token_id).select(rows.to(parts[0].rewards.device))
        rollout.metrics.update({"sampling/gen_rounds": len(parts),
                                "sampling/filtered_groups_frac": 1 - len(valid) / generated})
    else:
        rollout = parts[0]
    rollout.scores = rollout.rewards
    if cfg.overlong_buffer_len > 0:
        rollout.scores = rollout.rewards + ao.dapo_overlong_penalty(
            rollout.batch.lengths, cfg.max_completion_length, cfg.overlong_buffer_len,
            cfg.overlong_penalty_factor).to(rollout.rewards.device)
    return rollout


class Scorer:
    """Per-token quantities of a rollout batch before the update, each computed at most once:
    the rollout policy's log-probs, the reference's, and the critic's values."""

    def __init__(self, cfg, policy, ref, critic):
        self.cfg, self.policy, self.ref, self.critic = cfg, policy, ref, critic
        self._cache: dict = {}

    def _get(self, key, batch, fn):
        k = (key, id(batch))
        if k not in self._cache:
            self._cache[k] = (batch, fn())  # keeps batch alive so id() stays unique
        return self._cache[k][1]

    def old_logp(self, batch: Batch) -> torch.Tensor:
        return self._get("old", batch, lambda: completion_logprobs(self.policy, batch, self.cfg.temperature,
                                                                   self.cfg.backend))

    def ref_logp(self, batch: Batch) -> torch.Tensor:
        if self.ref is None:
            raise ValueError("this method needs a reference model (--ref_model)")
        return self._get("ref", batch, lambda: completion_logprobs(self.ref, batch, self.cfg.temperature,
                                                                   self.cfg.backend))

    def values(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return self._get("values", batch, lambda: completion_values(self.critic, batch))


def completion_values(critic, batch: Batch) -> torch.Tensor:
    """V of the state before each completion token: [B, T], aligned like sequence_logits."""
    v = critic(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids())
    return v[:, batch.prompt_len - 1:-1]


@dataclasses.dataclass
class Prepared:
    """What a preset hands the update: the batch, per-row data sliced with each micro-batch
    (advantages [B] or [B, T], returns, ...), per-step loss overrides and metrics."""

    batch: Batch
    data: dict
    loss_overrides: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    """What a preset may use besides the rollout: the models, the task, the current in-reward KL
    coefficient, more rollouts (CPPO's refill), and the run's reward functions (ReMax's baseline)."""

    policy: torch.nn.Module
    tok: CharTokenizer
    task: object
    kl_coef: float
    sample_more: object
    reward_model: object = dataclasses.field(default_factory=lambda: RewardModel("accuracy"))


# --------------------------------------------------------------------------------------------
# the update


def minibatches(cfg, preset, B: int, device) -> list[torch.Tensor]:
    """Row indices of each mini-batch; methods that compare a group's rows (GVPO) keep groups whole."""
    if cfg.num_mini_batches == 1:
        return [torch.arange(B, device=device)]
    if preset.whole_groups:
        G = cfg.num_generations
        groups = torch.randperm(B // G, device=device)
        order = (groups[:, None] * G + torch.arange(G, device=device)).reshape(-1)
    else:
        order = torch.randperm(B, device=device)
    return list(order.chunk(cfg.num_mini_batches))


def policy_update(cfg, preset, policy, opt, prep: Prepared, scorer: Scorer, critic=None, critic_opt=None) -> dict:
    """num_iterations epochs x num_mini_batches optimiser steps, each accumulated over
    gradient_accumulation_steps micro-batches with the mini-batch's global normaliser, so
    micro-batching gives the same update as one big batch. The critic (PPO family) takes its
    step on the same mini-batch, with its own optimiser."""
    batch = prep.batch
    B = batch.input_ids.shape[0]
    on_policy = cfg.num_iterations == 1 and cfg.num_mini_batches == 1
    data = dict(prep.data)
    data["labels"] = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
    data["mask"] = batch.completion_mask
    if cfg.mask_truncated_completions:
        data["mask"] = batch.completion_mask * (~batch.truncated)[:, None]
    if not on_policy or preset.needs_old_logp(cfg):
        data["old_logp"] = scorer.old_logp(batch)
    if scorer.ref is not None and preset.needs_reference(cfg):
        data["ref_logp"] = scorer.ref_logp(batch)
    if critic is not None:
        data["old_values"] = scorer.values(batch)
    sums: dict[str, float] = {}
    n_updates = 0

    def add(metrics, weight=1.0):
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * weight

    for _ in range(cfg.num_iterations):
        for mb in minibatches(cfg, preset, B, batch.input_ids.device):
            norms = preset.normalizers(cfg, {k: v[mb] for k, v in data.items()})
            micros = mb.chunk(cfg.gradient_accumulation_steps)
            opt.zero_grad(set_to_none=True)
            for micro in micros:
                d = {k: v[micro] for k, v in data.items()}
                out = preset.loss(cfg, logits=sequence_logits(policy, batch.select(micro)), data=d, norms=norms,
                                  overrides=prep.loss_overrides)
                out.loss.backward()
                add(out.metrics, len(micro) / len(mb))
                add({"loss": out.loss.detach()})
            add({"grad_norm": torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)})
            opt.step()
            if critic is not None:
                add(critic_step(cfg, critic, critic_opt, batch, data, mb))
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


def critic_step(cfg, critic, critic_opt, batch: Batch, data: dict, mb: torch.Tensor) -> dict:
    """One optimiser step of the clipped value loss on a mini-batch (micro-batched like the actor),
    aggregated with critic_agg and divided by the critic's own normaliser over the mini-batch."""
    critic_opt.zero_grad(set_to_none=True)
    metrics: dict[str, float] = {}
    agg, normalizer = critic_agg(cfg), critic_normalizer(cfg, data["mask"][mb])
    for micro in mb.chunk(cfg.gradient_accumulation_steps):
        values = completion_values(critic, batch.select(micro))
        out = ao.value_loss(values, data["old_values"][micro], data["returns"][micro], data["mask"][micro],
                            clip_range=cfg.cliprange_value, agg=agg, normalizer=normalizer,
                            max_len=cfg.max_completion_length)
        out.loss.backward()
        for k, v in out.metrics.items():
            # vf_loss is this micro-batch's share of the step's loss (global normaliser): summed;
            # the other metrics are per-micro-batch means: weighted by rows
            w = 1.0 if k == "vf_loss" else len(micro) / len(mb)
            metrics[f"critic/{k}"] = metrics.get(f"critic/{k}", 0.0) + float(v) * w
    metrics["critic/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm))
    critic_opt.step()
    return metrics


def pretrain_critic(cfg, critic, critic_opt, collect) -> dict:
    """VC-PPO/VAPO value pretraining: the policy is frozen (rollouts only) and the critic learns
    Monte-Carlo targets (GAE with lambda = 1: the return R at every token)."""
    metrics: dict = {}
    for _ in range(cfg.value_pretrain_steps):
        rollout = collect()
        batch, mask = rollout.batch, rollout.batch.completion_mask
        with torch.no_grad():
            old_values = completion_values(critic, batch)
        rewards = ao.token_level_rewards(rollout.scores, mask)
        returns = ao.gae_advantages(rewards, old_values, mask, gamma=cfg.gamma, lam=1.0).returns
        data = {"old_values": old_values, "returns": returns, "mask": mask}
        metrics = critic_step(cfg, critic, critic_opt, batch, data, torch.arange(mask.shape[0], device=mask.device))
    return {k.replace("critic/", "value_pretrain/"): v for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# the RL loop


def build_critic(policy) -> torch.nn.Module:
    """A value model with the policy's architecture, its trunk initialised from the policy (the
    SFT base), its scalar head from zero."""
    from alignops.train.model import ValueModel  # noqa: PLC0415

    critic = ValueModel(policy.config).to(next(policy.parameters()).device)
    critic.trunk.load_state_dict(policy.get_decoder().state_dict())
    return critic


def reference_model(cfg, policy, preset):
    if not preset.needs_reference(cfg):
        return None
    if cfg.ref_model in (None, "none"):
        raise ValueError(f"method {cfg.method!r} with these options needs a reference model "
                         f"(beta={cfg.beta}, kl_in_reward={cfg.kl_in_reward}); --ref_model is none")
    if cfg.ref_model == "init":
        return frozen_copy(policy)
    if ckpt.is_checkpoint(cfg.ref_model):  # an alignops checkpoint of the policy's architecture
        ref = frozen_copy(policy)
        ckpt.load_model_weights(cfg.ref_model, ref)
        return ref
    return frozen_copy(build_policy(0, cfg.ref_model).to(cfg.device))  # a Hugging Face checkpoint


def train(cfg: TrainConfig) -> dict:
    from alignops.train.presets import get_preset  # noqa: PLC0415

    preset = get_preset(cfg.method)
    preset.validate(cfg)
    reward_model = RewardModel(cfg.reward_funcs, cfg.reward_weights)
    out_dir = cfg.resolved_output_dir()
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng, generator = random.Random(cfg.seed), torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    task, tok, policy = setup(cfg)
    if cfg.init_from and cfg.init_from != "none" and not cfg.model:
        if not ckpt.is_checkpoint(cfg.init_from):
            raise ValueError(f"no base checkpoint at {cfg.init_from!r}: run `python -m alignops.train sft` "
                             f"first, or pass --init_from none")
        ckpt.load_model_weights(cfg.init_from, policy)
    ref = reference_model(cfg, policy, preset)
    critic = build_critic(policy) if preset.needs_critic(cfg) else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate) if critic else None
    kl_ctl = (ao.AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon) if cfg.kl_ctrl == "adaptive"
              else ao.FixedKLController(cfg.beta))
    log = MetricLog(os.path.join(out_dir, "metrics.jsonl"), cfg.resume)
    start, elapsed = 0, 0.0
    preset.load_state({})  # presets are shared objects: no state leaks from an earlier run

    def collect():
        return collect_rollouts(cfg, task, tok, policy, reward_model, rng, generator)

    # the run's checkpoint (<out_dir>/checkpoint; a run from before the subdirectory: out_dir), an
    # interrupted save repaired: every file below comes from that one committed checkpoint
    where = ckpt.locate(out_dir) if cfg.resume else None
    if where is not None:
        from safetensors.torch import load_file  # noqa: PLC0415
        state = ckpt.load_json(os.path.join(where, "state.json"))
        ckpt.load_model_weights(where, policy)
        ckpt.load_optimizer(opt, load_file(os.path.join(where, "optim.safetensors")), state["optimizer"])
        if critic is not None:
            critic.load_state_dict(load_file(os.path.join(where, "critic.safetensors")))
            ckpt.load_optimizer(critic_opt, load_file(os.path.join(where, "critic_optim.safetensors")),
                                state["critic_optimizer"])
        ckpt.set_rng_state(state["rng"], generator, rng)
        preset.load_state(state.get("preset", {}))
        kl_ctl.value = state.get("kl_coef", kl_ctl.value)
        start, elapsed = state["step"], state["elapsed_s"]
        log.truncate(start)
    else:
        log.truncate(-1)  # resume without a checkpoint (killed before its first save): a fresh run
        row = {"step": 0, **evaluation(cfg, policy, task, tok)}
        if critic is not None and cfg.value_pretrain_steps:
            t0 = time.time()
            row.update(pretrain_critic(cfg, critic, critic_opt, collect))
            elapsed += time.time() - t0
            row["time_s"] = elapsed
        log.add(row)

    def save(step):
        state = {"step": step, "elapsed_s": elapsed, "rng": ckpt.rng_state(generator, rng),
                 "preset": preset.state(), "kl_coef": kl_ctl.value, "config": dict(vars(cfg))}
        extra = {}
        if critic is not None:
            tensors, state["critic_optimizer"] = ckpt.optimizer_tensors(critic_opt)
            extra = {"critic.safetensors": critic.state_dict(), "critic_optim.safetensors": tensors}
        # one save, all files: a crash leaves the previous checkpoint or this one (checkpoint.py)
        ckpt.save_checkpoint(os.path.join(out_dir, ckpt.CHECKPOINT_SUBDIR), policy, opt, tokenizer=tok, state=state,
                             extra_tensors=extra)

    bar = progress(range(start, cfg.max_steps), cfg.progress, desc=cfg.method, initial=start,
                   total=None if cfg.time_budget_s else cfg.max_steps)
    step = start
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:  # from the step counter, so a resumed run gets the same rates
            g["lr"] = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        rollout = collect()
        scorer = Scorer(cfg, policy, ref, critic)
        prep = preset.prepare(cfg, rollout, scorer, Context(policy, tok, task, kl_ctl.value, collect, reward_model))
        metrics = policy_update(cfg, preset, policy, opt, prep, scorer, critic, critic_opt)
        if cfg.kl_in_reward:
            metrics["kl_coef"] = kl_ctl.value
            kl_ctl.update(float(prep.metrics.get("kl", 0.0)), n_steps=int(prep.batch.input_ids.shape[0]))
        elapsed += time.time() - t0
        rewards, G = rollout.rewards, cfg.num_generations
        r = rewards.view(-1, G) if rewards.numel() % G == 0 else rewards.view(1, -1)
        row = {"step": step + 1, "reward": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else 0.0,
               "frac_reward_zero_std": (r.std(-1) == 0).float().mean(), "accuracy": rollout.correct.float().mean(),
               "completions/mean_length": rollout.batch.lengths.mean(),
               "completions/clipped_ratio": rollout.batch.truncated.float().mean(),
               "time_s": elapsed, **rollout.metrics, **prep.metrics, **metrics}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            row.update(evaluation(cfg, policy, task, tok))
        log.add(row)
        if cfg.progress:
            bar.set_postfix(reward=f"{float(row['reward']):.2f}", acc=row.get("eval/accuracy", ""))
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)
        if cfg.time_budget_s and elapsed >= cfg.time_budget_s:
            step += 1
            break
    else:
        step = cfg.max_steps
    if "eval/accuracy" not in log.rows[-1]:
        log.add({"step": step, **evaluation(cfg, policy, task, tok)})
    save(step)
    plot_curves(log.rows, os.path.join(out_dir, "curves.png"), cfg.method)
    evals = [r for r in log.rows if "eval/accuracy" in r]
    sampled = f"eval/mean@{cfg.eval_samples}"
    return {"method": cfg.method, "steps": step, "seconds": round(elapsed, 1),
            "accuracy_before": evals[0]["eval/accuracy"], "accuracy_after": evals[-1]["eval/accuracy"],
            "sampled_before": evals[0].get(sampled), "sampled_after": evals[-1].get(sampled), "log": log.rows}
