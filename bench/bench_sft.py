"""Fused sft_loss (DFT weighting) and sequence_logprobs vs the eager path trainers use.

    python -m bench.bench_sft                  # CPU: N=2048 (B=4 x T=512), V=32000, fp32
    python -m bench.bench_sft --device cuda    # N=8192 (B=8 x T=1024), V in {128256, 151936}, bf16

eager   = what DFT's reference trainer and TRL's DPO/ORPO concatenated_forward do: logits.float(),
          log_softmax, gather, (DFT: p = exp(logp).detach()), masked sums, under autograd.
compile = torch.compile of that same function.
alignops = ao.sft_loss(..., weighting="dft") / ao.sequence_logprobs(...): one fused pass over the
          logits forward, one read + one write backward.
"""

from __future__ import annotations


import torch

import alignops as ao
from bench.harness import Case, bench_main


def eager_token_logprobs(logits, labels, mask):
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    return logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask


def eager_dft_loss(logits, labels, mask):
    logp = eager_token_logprobs(logits, labels, mask)
    return -(logp.exp().detach() * logp).sum() / mask.sum().clamp_min(1)


def eager_sequence_logprobs(logits, labels, mask):
    return eager_token_logprobs(logits, labels, mask).sum(-1)


def make_cases(b, t, v, dtype, device, backend=None):
    def make_inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype=dtype, device=device)
        labels = torch.randint(0, v, (b, t), generator=g).to(device)
        mask = (torch.rand(b, t, generator=g) > 0.1).to(device)
        return {"logits": logits, "labels": labels, "mask": mask}

    elem = torch.finfo(dtype).bits // 8
    nbytes = b * t * v * elem
    shape = {"N": b * t, "V": v, "dtype": str(dtype).replace("torch.", ""), "device": device}
    tag = f"N={b * t} V={v} {shape['dtype']}"
    compiled_dft = torch.compile(eager_dft_loss)
    compiled_seq = torch.compile(eager_sequence_logprobs)
    sft = Case(f"sft_loss dft {tag}", {"op": "sft_loss(dft)", **shape}, make_inputs, {
        "alignops": lambda x: ao.sft_loss(x["logits"], x["labels"], x["mask"], "dft", backend=backend).loss,
        "eager": lambda x: eager_dft_loss(x["logits"], x["labels"], x["mask"]),
        "compile": lambda x: compiled_dft(x["logits"], x["labels"], x["mask"]),
    }, grad_inputs=("logits",), bytes_moved={"fwd": nbytes, "bwd": 2 * nbytes, "fwd+bwd": 3 * nbytes})
    seq = Case(f"sequence_logprobs {tag}", {"op": "sequence_logprobs", **shape}, make_inputs, {
        "alignops": lambda x: ao.sequence_logprobs(x["logits"], x["labels"], x["mask"], backend=backend),
        "eager": lambda x: eager_sequence_logprobs(x["logits"], x["labels"], x["mask"]),
        "compile": lambda x: compiled_seq(x["logits"], x["labels"], x["mask"]),
    }, grad_inputs=("logits",), bytes_moved={"fwd": nbytes, "bwd": 2 * nbytes, "fwd+bwd": 3 * nbytes})
    return [sft, seq]


def cases_for(device: str, quick: bool = False, backend=None):
    if device == "cuda":
        shapes = [(8, 1024, 128256), (8, 1024, 151936)] if not quick else [(1, 1024, 151936)]
        return [c for b, t, v in shapes for c in make_cases(b, t, v, torch.bfloat16, device, backend)]
    shapes = [(4, 512, 32000)] if not quick else [(1, 512, 32000)]  # 256 rows: see bench_token_logprobs
    return [c for b, t, v in shapes for c in make_cases(b, t, v, torch.float32, device, backend)]


def main(argv=None):
    return bench_main("sft", __doc__, cases_for, argv, reps=5)


if __name__ == "__main__":
    main()
