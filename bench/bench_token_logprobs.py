"""token_logprobs (log-probs + entropy, forward and backward) vs the eager path trainers use.

    python -m bench.bench_token_logprobs              # CPU: N=2048 V=32000 fp32, N=512 V=151936
    python -m bench.bench_token_logprobs --device cuda  # N=8192, V in {128256, 151936}, bf16
    python -m bench.bench_token_logprobs --size N=64,V=1000 --isa here  # one toy case (gpu.sh --dry-run)

Every row with a bandwidth also has the copy floor: `dst.copy_(logits)` timed in the same process
(copy_GB/s), and the row's GB/s as a percentage of it (%_of_copy).

eager   = TRL/verl style: logits.float() / T, log_softmax, gather, entropy from the softmax,
          under autograd (what trainers run today).
compile = torch.compile of that same function.
liger   = Liger-Kernel's fused cross entropy (log-probs only), when installed (GPU).
"""

from __future__ import annotations


import torch

import alignops as ao
from bench.harness import Case, bench_main, lazy_compile

TEMPERATURE = 0.9


def eager_logprobs_entropy(logits, labels, temperature=TEMPERATURE):
    logits = logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def make_case(n, v, dtype, device, backend=None):
    cache = {}

    def make_inputs():
        # drawn once per case (an [8192, 151936] draw takes seconds on the CPU) and shared: no
        # implementation writes its inputs (Liger's in-place gradient goes to its own logits / T)
        if not cache:
            g = torch.Generator(device="cpu").manual_seed(0)
            logits = (torch.randn(n, v, generator=g) * 2).to(dtype=dtype, device=device)
            labels = torch.randint(0, v, (n,), generator=g).to(device)
            cache.update(logits=logits, labels=labels)
        return dict(cache)

    compiled = lazy_compile(eager_logprobs_entropy)
    impls = {
        "alignops": lambda x: ao.token_logprobs(x["logits"], x["labels"], temperature=TEMPERATURE,
                                                compute_entropy=True, backend=backend),
        "eager": lambda x: eager_logprobs_entropy(x["logits"], x["labels"]),
        "compile": lambda x: compiled(x["logits"], x["labels"]),
    }
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy  # noqa: PLC0415
            impls["liger(ce only)"] = lambda x: -liger_cross_entropy(
                x["logits"] / TEMPERATURE, x["labels"], reduction="none")
        except Exception as e:  # noqa: BLE001 - a peer that does not import is left out, not fatal
            if not isinstance(e, ImportError):
                print(f"  liger left out: {type(e).__name__}: {str(e)[:200]}")
    elem = torch.finfo(dtype).bits // 8
    nbytes = n * v * elem
    name = f"N={n} V={v} {str(dtype).replace('torch.', '')}"
    return Case(name, {"N": n, "V": v, "dtype": str(dtype).replace("torch.", ""), "device": device},
                make_inputs, impls, grad_inputs=("logits",),
                bytes_moved={"fwd": nbytes, "bwd": 2 * nbytes, "fwd+bwd": 3 * nbytes}, copy_input="logits")


def cases_for(device: str, quick: bool = False, size: dict | None = None):
    if size:  # --size N=..,V=..: one case (bf16 on CUDA, fp32 on CPU)
        return [make_case(size["N"], size["V"], torch.bfloat16 if device == "cuda" else torch.float32, device)]
    if device == "cuda":
        shapes = [(8192, 128256), (8192, 151936)] if not quick else [(1024, 151936)]
        return [make_case(n, v, torch.bfloat16, device) for n, v in shapes]
    # quick: 256 rows of 32000 or 32003 make torch 2.13's AVX-512 inductor code (the compile row)
    # corrupt the heap and abort; 512 rows do not
    shapes = [(2048, 32000), (512, 151936)] if not quick else [(512, 32000)]
    return [make_case(n, v, torch.float32, device) for n, v in shapes]


def main(argv=None):
    return bench_main("token_logprobs", __doc__, cases_for, argv, reps=5)


if __name__ == "__main__":
    main()
