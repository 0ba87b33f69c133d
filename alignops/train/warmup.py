"""The SFT warm-up: the shared starting policy ("base model") of every method, trained on the
task's expert completions."""

from __future__ import annotations

import math
import random
import time

import torch

import alignops as ao
from alignops.train import checkpoint as ckpt
from alignops.train.config import TrainConfig
from alignops.train.evaluate import evaluate
from alignops.train.metrics import progress
from alignops.train.trainer import setup


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
