"""Held-out evaluation on the task's fixed problems: greedy accuracy, and mean@k of the sampling
policy."""

from __future__ import annotations

import torch

from alignops.train.rollout import generate


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
    """The run's evaluation row: greedy accuracy, and mean@eval_samples at the rollout temperature."""
    out = {"eval/accuracy": evaluate(model, task, tok, cfg.eval_size, cfg.max_completion_length)}
    if cfg.eval_samples:
        out[f"eval/mean@{cfg.eval_samples}"] = evaluate(model, task, tok, cfg.eval_size, cfg.max_completion_length,
                                                        samples=cfg.eval_samples, temperature=cfg.temperature)
    return out
