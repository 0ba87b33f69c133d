"""The reference trainer's own cost: RL steps per second of `python -m alignops.train --method grpo`
against a plain GRPO loop doing the same work, in one run.

    python -m bench.trainer_overhead                 # 3 rounds of A B, 40 steps each
    python -m bench.trainer_overhead --steps 20 --rounds 2

Same model (the SFT base), batch (16 prompts x 8 samples), sampling (the trainer's KV-cache sampler,
temperature 1, 6 new tokens), optimiser (AdamW, lr 3e-5, grad clip 1) and no KL term (beta 0, so
neither side runs a reference model). The plain loop is what a user writes in ~30 lines: rewards
from the verifier, group-normalised advantages, eager log_softmax over the logits, the clipped
surrogate, token means per sequence, backward, step. The trainer adds its machinery (reward
functions, the advantage registry, the scorer, micro-batching with global normalisers, metrics)
and computes the loss from hidden states with alignops' fused lm_head op. Timed per step with
evaluation excluded on both sides, rounds alternated (A B A B) so drift on a shared machine hits
both; the ratio is the result. Writes bench/results/trainer_overhead.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time

import torch

from bench.harness import RESULTS, machine_description


def plain_grpo_steps(cfg, steps: int) -> float:
    """Steps per second of the plain loop from the base (timed after one untimed step)."""
    from alignops.train.rollout import generate  # noqa: PLC0415
    from alignops.train.trainer import setup_from_base  # noqa: PLC0415

    torch.manual_seed(cfg.seed)
    task, tok, policy = setup_from_base(cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    G = cfg.num_generations
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()
        problems = [p for p in task.sample(rng, cfg.num_prompts) for _ in range(G)]
        batch = generate(policy, [tok.encode(p.prompt, bos=True) for p in problems], max_new_tokens=cfg.max_completion_length,
                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=cfg.temperature, generator=gen)
        rewards = torch.tensor([task.reward(p, tok.decode(ids)) for p, ids in zip(problems, batch.completion_ids)])
        r = rewards.view(-1, G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
        logp = torch.log_softmax(logits[:, batch.prompt_len - 1:-1].float(), -1).gather(
            -1, batch.completion_ids[..., None]).squeeze(-1)
        ratio = torch.exp(logp - batch.behaviour_logp)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        mask = batch.completion_mask
        loss = -((surrogate * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        opt.step()
    return steps / (time.perf_counter() - t0)


def trainer_steps(cfg, steps: int, out_dir: str) -> float:
    """Steps per second of the trainer's own clock (evaluation excluded), first step left out."""
    from alignops.train.trainer import train  # noqa: PLC0415

    res = train(dataclasses.replace(cfg, max_steps=steps + 1, output_dir=out_dir))
    rows = [r for r in res["log"] if "loss" in r]
    return steps / (rows[-1]["time_s"] - rows[0]["time_s"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--base", default="runs/base")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)

    from alignops.train import checkpoint as ckpt  # noqa: PLC0415
    from alignops.train.presets import make_config  # noqa: PLC0415

    if not ckpt.is_checkpoint(args.base):
        raise SystemExit(f"no SFT base at {args.base}: run `python -m alignops.train sft` first")
    cfg = make_config("grpo", {"init_from": args.base, "beta": 0.0, "warmup_steps": 1, "eval_every": 10**6,
                               "eval_size": 1, "eval_samples": 0, "progress": False})
    plain, trainer, trainer_logits = [], [], []
    for k in range(args.rounds):
        trainer.append(trainer_steps(cfg, args.steps, f"runs/overhead/trainer{k}"))
        plain.append(plain_grpo_steps(cfg, args.steps))
        trainer_logits.append(trainer_steps(dataclasses.replace(cfg, fused_lm_head=False), args.steps,
                                            f"runs/overhead/logits{k}"))
        print(f"round {k}: trainer {trainer[-1]:.2f} steps/s, trainer (logits path) {trainer_logits[-1]:.2f}, "
              f"plain loop {plain[-1]:.2f}", flush=True)
    med = statistics.median
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trainer_overhead.md"), "w") as f:
        f.write(f"# The trainer's own cost\n\n{machine_description()}. "
                f"Command: `python -m bench.trainer_overhead --steps {args.steps} --rounds {args.rounds}`. GRPO from "
                f"the SFT base, 16 prompts x 8 samples, 6 new tokens, AdamW lr 3e-5, beta 0; steps/s over "
                f"{args.steps} steps after one untimed step, evaluation excluded, rounds alternated.\n\n")
        f.write("| loop | steps/s per round | median | vs plain loop |\n|---|---|---|---|\n")
        for name, xs in (("plain loop (eager log_softmax)", plain), ("trainer (fused lm_head, default)", trainer),
                         ("trainer --fused_lm_head false", trainer_logits)):
            f.write(f"| {name} | {', '.join(f'{x:.2f}' for x in xs)} | {med(xs):.2f} | {med(xs) / med(plain):.2f}x |\n")
    print(open(os.path.join(args.out, "trainer_overhead.md")).read())


if __name__ == "__main__":
    main()
