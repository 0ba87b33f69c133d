"""The RL loop, top to bottom: rollout -> rewards -> advantages -> epochs x mini-batches of the
fused policy loss -> AdamW -> metrics. Methods differ only through their preset (presets.py)."""

from __future__ import annotations

import json
import math
import os
import random
import time

import torch

import alignops as ao
from alignops.train import checkpoint as ckpt
from alignops.train.config import TrainConfig
from alignops.train.model import build_policy, frozen_copy
from alignops.train.rollout import Batch, generate
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
def evaluate(model, task, tok, size: int, max_new_tokens: int, batch_size: int = 500) -> float:
    """Greedy accuracy on the task's fixed held-out problems (the same set for every method)."""
    problems = task.heldout[:size]
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        b = generate(model, [tok.encode(p.prompt, bos=True) for p in chunk], max_new_tokens=max_new_tokens,
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0)
        correct += sum(task.reward(p, tok.decode(ids)) for p, ids in zip(chunk, b.completion_ids))
    return correct / max(1, len(problems))


def normalizer_for(agg: str, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """The aggregation's denominator over one optimiser step (METHODS.md §00.2)."""
    if agg == "token-mean":
        return mask.sum()
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return (mask.sum(-1) > 0).sum()
    return torch.tensor(float(mask.shape[0] * max_len))


class MetricLog:
    def __init__(self, path: str | None, resume: bool):
        self.path, self.rows = path, []
        if path and resume and os.path.exists(path):
            with open(path) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
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
    steps = [r["step"] for r in rows if "reward" in r]
    ax[0].plot(steps, [r["reward"] for r in rows if "reward" in r], lw=1)
    ax[0].set(xlabel="step", ylabel="mean reward", title=f"{title}: training reward")
    ev = [r for r in rows if "eval/accuracy" in r]
    ax[1].plot([r["step"] for r in ev], [100 * r["eval/accuracy"] for r in ev], marker="o")
    ax[1].set(xlabel="step", ylabel="held-out accuracy (%)", title="greedy held-out accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # noqa: PLC0415
    return tqdm(iterable, **kw)


# --------------------------------------------------------------------------------------------
# SFT warm-up: the shared starting policy ("base model") of every method


def sft_warmup(cfg: TrainConfig, steps: int = 3000, batch_size: int = 64, lr: float = 3e-3,
               time_budget_s: float = 60.0, out_dir: str = "runs/base") -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task, tok, policy = setup(cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
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
        if cfg.progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.time() - t0 > time_budget_s:
            break
    acc = evaluate(policy, task, tok, cfg.eval_size, cfg.max_completion_length)
    info = {"kind": "sft_base", "steps": step + 1, "seconds": round(time.time() - t0, 1),
            "heldout_accuracy": acc, "task": cfg.task, "arch": cfg.arch, "seed": cfg.seed}
    ckpt.save_checkpoint(out_dir, policy, state=info, tokenizer=tok)
    return info


# --------------------------------------------------------------------------------------------
# the RL loop


def rollout_step(cfg, preset, task, tok, policy, rng, generator):
    """Samples num_prompts x num_generations completions and scores them."""
    problems = task.sample(rng, cfg.num_prompts)
    group = [p for p in problems for _ in range(cfg.num_generations)]
    batch = generate(policy, [tok.encode(p.prompt, bos=True) for p in group],
                     max_new_tokens=cfg.max_completion_length, eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                     generator=generator)
    texts = [tok.decode(ids) for ids in batch.completion_ids]
    rewards = torch.tensor([task.reward(p, t) for p, t in zip(group, texts)], dtype=torch.float32,
                           device=batch.input_ids.device)
    return group, batch, texts, rewards


def policy_update(cfg, preset, policy, ref, opt, batch: Batch, advantages: torch.Tensor) -> dict:
    """num_iterations epochs x num_mini_batches optimiser steps, each accumulated over
    gradient_accumulation_steps micro-batches with the mini-batch's global normaliser, so
    micro-batching gives the same update as one big batch."""
    B = batch.input_ids.shape[0]
    on_policy = cfg.num_iterations == 1 and cfg.num_mini_batches == 1
    old_logp = None if on_policy else completion_logprobs(policy, batch, cfg.temperature, cfg.backend)
    ref_logp = completion_logprobs(ref, batch, cfg.temperature, cfg.backend) if ref is not None else None
    labels = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(cfg.num_iterations):
        order = torch.randperm(B, device=batch.input_ids.device) if cfg.num_mini_batches > 1 else torch.arange(B)
        for mb in order.chunk(cfg.num_mini_batches):
            mask = batch.completion_mask[mb]
            normalizer = normalizer_for(cfg.loss_type, mask, cfg.max_completion_length)
            opt.zero_grad(set_to_none=True)
            for micro in mb.chunk(cfg.gradient_accumulation_steps):
                sub = batch.select(micro)
                out = preset.loss(cfg, logits=sequence_logits(policy, sub), labels=labels[micro],
                                  old_logp=None if old_logp is None else old_logp[micro],
                                  advantages=advantages[micro], mask=sub.completion_mask,
                                  ref_logp=None if ref_logp is None else ref_logp[micro],
                                  normalizer=normalizer)
                out.loss.backward()
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(micro) / len(mb)
                sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


def train(cfg: TrainConfig) -> dict:
    from alignops.train.presets import get_preset  # noqa: PLC0415

    preset = get_preset(cfg.method)
    preset.validate(cfg)
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
    ref = frozen_copy(policy) if preset.needs_reference(cfg) else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    log = MetricLog(os.path.join(out_dir, "metrics.jsonl"), cfg.resume)
    start, elapsed = 0, 0.0
    preset.load_state({})  # presets are shared objects: no state leaks from an earlier run
    if cfg.resume and ckpt.is_checkpoint(out_dir):
        state = ckpt.load_json(os.path.join(out_dir, "state.json"))
        ckpt.load_model_weights(out_dir, policy)
        from safetensors.torch import load_file  # noqa: PLC0415
        ckpt.load_optimizer(opt, load_file(os.path.join(out_dir, "optim.safetensors")), state["optimizer"])
        ckpt.set_rng_state(state["rng"], generator, rng)
        preset.load_state(state.get("preset", {}))
        start, elapsed = state["step"], state["elapsed_s"]
        log.truncate(start)
    else:
        acc0 = evaluate(policy, task, tok, cfg.eval_size, cfg.max_completion_length)
        log.add({"step": 0, "eval/accuracy": acc0})

    def save(step):
        ckpt.save_checkpoint(out_dir, policy, opt, tokenizer=tok, state={
            "step": step, "elapsed_s": elapsed, "rng": ckpt.rng_state(generator, rng),
            "preset": preset.state(), "config": {k: v for k, v in vars(cfg).items()}})

    bar = progress(range(start, cfg.max_steps), cfg.progress, desc=cfg.method, initial=start, total=cfg.max_steps)
    step = start
    for step in bar:
        t0 = time.time()
        group, batch, texts, rewards = rollout_step(cfg, preset, task, tok, policy, rng, generator)
        batch, rewards, adv, extra = preset.prepare(cfg, batch, rewards, group=group, texts=texts,
                                                    policy=policy, tok=tok, task=task)
        metrics = policy_update(cfg, preset, policy, ref, opt, batch, adv)
        elapsed += time.time() - t0
        G = cfg.num_generations
        r = rewards.view(-1, G) if rewards.numel() % G == 0 else rewards.view(1, -1)
        row = {"step": step + 1, "reward": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else 0.0,
               "frac_reward_zero_std": (r.std(-1) == 0).float().mean(),
               "completions/mean_length": batch.lengths.mean(),
               "completions/clipped_ratio": batch.truncated.float().mean(),
               "time_s": elapsed, **extra, **metrics}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            row["eval/accuracy"] = evaluate(policy, task, tok, cfg.eval_size, cfg.max_completion_length)
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
        log.add({"step": step, "eval/accuracy": evaluate(policy, task, tok, cfg.eval_size, cfg.max_completion_length)})
    save(step)
    plot_curves(log.rows, os.path.join(out_dir, "curves.png"), cfg.method)
    accs = [r["eval/accuracy"] for r in log.rows if "eval/accuracy" in r]
    return {"method": cfg.method, "steps": step, "seconds": round(elapsed, 1),
            "accuracy_before": accs[0], "accuracy_after": accs[-1], "log": log.rows}
