"""Advantage kernels vs the eager paths trainers run today (forward only: advantages carry no grad).

    python -m bench.bench_advantages                 # CPU (cpu backend)
    python -m bench.bench_advantages --device cuda   # GPU (triton backend)

Shapes: group normalisation on B = 4096 rewards, G = 8; GAE and whitening on
512 x 1024 tokens (fp32, ~20 % right padding plus holes).

grpo:   alignops     ao.grpo_advantages (fused group kernel, ragged-capable layout)
        eager        verl's reference estimator: a Python loop building per-group lists
        trl-view     TRL's vectorised form for equal groups: view(-1, G).mean/std
        torch-ref    alignops' own torch backend (scatter/index ops, ragged-capable)
gae:    alignops     ao.gae_advantages (fused scan, masked positions transparent)
        eager        verl's loop over T, vectorised over rows
whiten: alignops     ao.masked_whiten (fused moments + apply)
        eager        verl's masked_mean / masked_var / rsqrt
"""

from __future__ import annotations

from collections import defaultdict

import torch

import alignops as ao
from bench.harness import Case, bench_main


def verl_grpo_loop(scores, index, eps=1e-6):
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, vals in id2score.items():
        t = torch.stack(vals)
        id2mean[idx], id2std[idx] = t.mean(), t.std()
    out = scores.clone()
    for i in range(scores.shape[0]):
        out[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return out


def trl_view(rewards, G, eps=1e-6):
    g = rewards.view(-1, G)
    mean = g.mean(1).repeat_interleave(G)
    std = g.std(1).repeat_interleave(G)
    return (rewards - mean) / (std + eps)


def verl_gae_loop(rewards, values, mask, gamma, lam):
    T = rewards.shape[1]
    next_values = torch.zeros_like(rewards[:, 0])
    last = torch.zeros_like(rewards[:, 0])
    out = []
    m = mask.to(rewards.dtype)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        new = delta + gamma * lam * last
        next_values = values[:, t] * m[:, t] + (1 - m[:, t]) * next_values
        last = new * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def verl_masked_whiten(x, mask, eps=1e-8):
    m = mask.to(x.dtype)
    mean = (x * m).sum() / (m.sum() + 1e-8)
    var = ((x - mean) ** 2 * m).sum() / (m.sum() + 1e-8)
    var = var * m.sum() / (m.sum() - 1)
    return (x - mean) * torch.rsqrt(var + eps)


def cases_for(device, backend=None, quick=False):
    backend = backend or ("triton" if device == "cuda" else "cpu")
    B, G = (512, 8) if quick else (4096, 8)
    rows, T = (64, 256) if quick else (512, 1024)

    def grpo_inputs():
        g = torch.Generator().manual_seed(0)
        r = (torch.rand(B, generator=g) > 0.5).float().to(device)
        return {"rewards": r, "index": [i // G for i in range(B)]}

    grpo = Case(f"grpo B={B} G={G}", {"B": B, "G": G, "T": "", "device": device}, grpo_inputs, {
        "alignops": lambda x: ao.grpo_advantages(x["rewards"], G, backend=backend),
        "eager": lambda x: verl_grpo_loop(x["rewards"], x["index"]),
        "trl-view": lambda x: trl_view(x["rewards"], G),
        "torch-ref": lambda x: ao.grpo_advantages(x["rewards"], G, backend="torch"),
    }, modes=("fwd",))

    def token_inputs():
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(T // 2, T + 1, (rows,), generator=g)
        mask = torch.arange(T)[None] < lengths[:, None]
        mask &= torch.rand(rows, T, generator=g) > 0.05  # tool-output holes
        return {"rewards": torch.randn(rows, T, generator=g).to(device),
                "values": torch.randn(rows, T, generator=g).to(device), "mask": mask.to(device)}

    shape = {"B": rows, "G": "", "T": T, "device": device}
    gae = Case(f"gae {rows}x{T}", shape, token_inputs, {
        "alignops": lambda x: ao.gae_advantages(x["rewards"], x["values"], x["mask"], 1.0, 0.95, backend=backend),
        "eager": lambda x: verl_gae_loop(x["rewards"], x["values"], x["mask"], 1.0, 0.95),
    }, modes=("fwd",))
    whiten = Case(f"whiten {rows}x{T}", shape, token_inputs, {
        "alignops": lambda x: ao.masked_whiten(x["rewards"], x["mask"], backend=backend),
        "eager": lambda x: verl_masked_whiten(x["rewards"], x["mask"]),
    }, modes=("fwd",))
    return [grpo, gae, whiten]


def main(argv=None):
    return bench_main("advantages", __doc__, cases_for, argv, reps=20)


if __name__ == "__main__":
    main()
