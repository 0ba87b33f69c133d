"""What the fused lm_head's fp32 logits tile costs and buys for bf16 hidden states and weight.

    python -m bench.bench_tile_precision                 # CPU: N=1024 H=896 V=151936, T=1.5, 3 rounds
    python -m bench.bench_tile_precision --size N=64,H=64,V=1000 --rounds 1   # toy case
    python -m bench.bench_tile_precision --device cuda --size N=4096,H=896,V=151936   # bench/gpu.sh

Two tiles, alternated in one process (A B A B ...; the table gives each one's median and the ratio):
  fp32 tile   today's LinearHead: the GEMM's fp32 accumulator is the tile (CPU: operands widened a
              block of weight rows at a time; CUDA: `torch.mm(..., out_dtype=float32)`).
  bf16 tile   the tile rounded to the operands' dtype, as LinearHead computed it before (a plain
              `torch.mm` of the bf16 operands), kept here only as the comparison.
Each runs `ao.fused_linear_token_logprobs(..., compute_entropy=True)` forward and backward with
verl's kernel-test inputs (uniform in [-0.5, 0.5]); the error columns are the largest |error| of
log-probs and entropy against float64 math on the same bf16 inputs (verl's tolerance for its
kernel: 1e-3 + 2e-4 |logp|, 5e-3 + 5e-4 |H|).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import alignops as ao
from alignops.logits import sources
from bench.harness import machine_name, parse_size


class _RoundedTile(sources.LinearHead):
    def _accumulate(self, h):
        return torch.mm(h.to(self.operands), self.weight_operand().t())


def _run(hidden, weight, labels, temperature, device):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lp, ent = ao.fused_linear_token_logprobs(h, w, labels, temperature=temperature, compute_entropy=True)
    (lp.sum() + ent.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, lp.detach(), ent.detach()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", help="N=...,H=...,V=...")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    size = parse_size(args.size) or dict(N=1024, H=896, V=151936)
    N, H, V, T = size["N"], size["H"], size["V"], 1.5
    g = torch.Generator().manual_seed(0)
    hidden = (torch.rand(N, H, generator=g) - 0.5).bfloat16()
    weight = (torch.rand(V, H, generator=g) - 0.5).bfloat16()
    labels = torch.randint(0, V, (N,), generator=g)
    hidden, weight, labels = hidden.to(args.device), weight.to(args.device), labels.to(args.device)
    want_lp, want_ent = [], []
    for s in range(0, N, 1024):  # float64 on the device, 1024 rows at a time
        lsm = torch.log_softmax(hidden[s:s + 1024].double() @ weight.double().T / T, -1)
        want_lp.append(lsm.gather(-1, labels[s:s + 1024, None])[:, 0].cpu())
        want_ent.append(-(lsm.exp() * lsm).sum(-1).cpu())
        del lsm
    want_lp, want_ent = torch.cat(want_lp), torch.cat(want_ent)

    tiles = {"fp32 tile": sources.LinearHead, "bf16 tile": _RoundedTile}
    times = {k: [] for k in tiles}
    errors = {}
    original = sources.LinearHead
    try:
        for _ in range(args.rounds):
            for name, cls in tiles.items():
                # fused_linear imports the class at call time through alignops.logits.sources
                sources.LinearHead = cls
                import alignops.fused_linear as fl
                fl.LinearHead = cls
                t, lp, ent = _run(hidden, weight, labels, T, args.device)
                times[name].append(t)
                errors[name] = ((lp.cpu().double() - want_lp).abs().max().item(),
                                (ent.cpu().double() - want_ent).abs().max().item())
    finally:
        sources.LinearHead = original
        import alignops.fused_linear as fl
        fl.LinearHead = original
    base = statistics.median(times["bf16 tile"])
    lines = [f"Fused lm_head, bf16 hidden and weight, N={N} H={H} V={V} T={T}, forward + backward, "
             f"{args.rounds} alternated rounds on {machine_name()} ({args.device}); "
             f"`python -m bench.bench_tile_precision`",
             "", "| tile | median s | vs bf16 tile | max abs err logp | max abs err entropy |", "|---|---|---|---|---|"]
    for name in tiles:
        m = statistics.median(times[name])
        lines.append(f"| {name} | {m:.3f} | {m / base:.2f}x | {errors[name][0]:.2e} | {errors[name][1]:.2e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
