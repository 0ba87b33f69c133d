"""Distillation losses against the peers' own code, side by side in one process, alternated.

    python -m bench.bench_distill                          # CPU: N=256 H=896 V=151936 fp32, 3 rounds
    python -m bench.bench_distill --size N=64,H=64,V=1000 --rounds 1     # toy case (gpu.sh --dry-run)
    python -m bench.bench_distill --device cuda --dtype bfloat16 --size N=8192,H=4096,V=151936

Forward + backward of the student's loss, the gradient reaching the student's hidden states and
lm_head weight (from hidden states) or the student's logits (from logits). Implementations:

  from hidden states   alignops   ao.fused_linear_distill_loss (never materialises [N, V])
                       liger      LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1)
                                  (compiled on CUDA, eager on CPU)
                       trl        h @ W.T for both models, then GKDTrainer.generalized_jsd_loss
  from logits          alignops   ao.distill_loss
                       trl        GKDTrainer.generalized_jsd_loss
                       liger      LigerJSD (a Triton kernel: CUDA only)

Divergences: JSD(beta = 0.5) and reverse KL (the peers' beta = 1), temperature 1, token mean over
the counted tokens (10 % ignored). Each round runs every implementation once (A B C A B C ...);
the table gives each one's median time and peak memory above its inputs (CUDA: the allocator's
peak; CPU: peak RSS, bench/harness.py), and both as ratios to alignops.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import alignops as ao
from bench.harness import Case, machine_name, parse_size, time_impl


def _trl_jsd():
    from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: PLC0415
    return GKDTrainer.generalized_jsd_loss


def _liger_fused(beta, device):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: PLC0415
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                   compiled=device == "cuda", chunk_size=1024)


def _liger_logits(beta):
    from liger_kernel.transformers import LigerJSD  # noqa: PLC0415
    return LigerJSD(beta=beta)


def cases(n, h, v, dtype, device, beta):
    divergence = "reverse_kl" if beta == 1.0 else "jsd"
    label = f"{'reverse KL' if beta == 1.0 else f'JSD beta={beta}'}"

    def hidden_inputs():
        g = torch.Generator().manual_seed(0)
        return {"hs": (torch.randn(n, h, generator=g) / h ** 0.5).to(dtype=dtype, device=device),
                "ws": (torch.randn(v, h, generator=g) * 0.6).to(dtype=dtype, device=device),
                "ht": (torch.randn(n, h, generator=g) / h ** 0.5).to(dtype=dtype, device=device),
                "wt": (torch.randn(v, h, generator=g) * 0.6).to(dtype=dtype, device=device),
                "labels": torch.where(torch.rand(n, generator=g) < 0.1, -100,
                                      torch.randint(0, v, (n,), generator=g)).to(device)}

    def logits_inputs():
        x = hidden_inputs()
        with torch.no_grad():
            return {"s": x["hs"] @ x["ws"].T, "t": x["ht"] @ x["wt"].T, "labels": x["labels"]}

    trl = _trl_jsd()
    liger_fused = _liger_fused(beta, device)

    def trl_from_hidden(x):
        with torch.no_grad():
            t = (x["ht"] @ x["wt"].T).unsqueeze(0)
        return trl((x["hs"] @ x["ws"].T).unsqueeze(0), t, x["labels"].unsqueeze(0), beta=beta)

    hidden = Case(f"from hidden, {label}", {}, hidden_inputs, {
        "alignops": lambda x: ao.fused_linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"],
                                                           divergence=divergence, beta=beta).loss,
        "liger": lambda x: liger_fused(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"]),
        "trl": trl_from_hidden,
    }, grad_inputs=("hs", "ws"))
    impls = {
        "alignops": lambda x: ao.distill_loss(x["s"], x["t"], x["labels"], divergence=divergence, beta=beta).loss,
        "trl": lambda x: trl(x["s"].unsqueeze(0), x["t"].unsqueeze(0), x["labels"].unsqueeze(0), beta=beta),
    }
    if device == "cuda":
        liger_logits = _liger_logits(beta)
        impls["liger"] = lambda x: liger_logits(torch.log_softmax(x["s"].float(), -1),
                                                torch.log_softmax(x["t"].float(), -1), x["labels"])
    logits = Case(f"from logits, {label}", {}, logits_inputs, impls, grad_inputs=("s",))
    return [hidden, logits]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", help="N=...,H=...,V=...")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    size = parse_size(args.size) or dict(N=256, H=896, V=151936)
    n, h, v = size["N"], size["H"], size["V"]
    dtype = getattr(torch, args.dtype)
    all_cases = [c for beta in (0.5, 1.0) for c in cases(n, h, v, dtype, args.device, beta)]
    times = {(c.name, k): [] for c in all_cases for k in c.impls}
    peaks = {}
    for c in all_cases:  # warm-up (and the compile of Liger's chunk on CUDA), one call each
        for impl, fn in c.impls.items():
            time_impl(c, fn, "fwd+bwd", 0, 1)
    for _ in range(args.rounds):
        for c in all_cases:
            for impl, fn in c.impls.items():
                ms, peak = time_impl(c, fn, "fwd+bwd", 0, 1)
                times[(c.name, impl)].append(ms)
                peaks[(c.name, impl)] = max(peaks.get((c.name, impl), 0), peak)
    lines = [f"Distillation loss, forward + backward, N={n} H={h} V={v} {args.dtype}, median of {args.rounds} "
             f"alternated rounds on {machine_name()} ({args.device}); `python -m bench.bench_distill"
             + (f" --size N={n},H={h},V={v}" if args.size else "") + (f" --device {args.device}" if args.device != "cpu" else "")
             + (f" --dtype {args.dtype}" if args.dtype != "float32" else "") + f" --rounds {args.rounds}`", "",
             "| case | impl | median ms | time vs alignops | peak extra MiB | memory vs alignops |",
             "|---|---|---|---|---|---|"]
    for c in all_cases:
        base_t = statistics.median(times[(c.name, "alignops")])
        base_m = max(peaks[(c.name, "alignops")], 1)
        for impl in c.impls:
            t = statistics.median(times[(c.name, impl)])
            m = peaks[(c.name, impl)]
            lines.append(f"| {c.name} | {impl} | {t:.1f} | {t / base_t:.2f}x | {m / 2**20:.1f} | {m / base_m:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
