"""fused GRPO policy loss (+ k3 KL + entropy bonus) from logits, forward and backward, vs the eager
path trainers run today.

    python -m bench.bench_policy_loss                # CPU: N=2048 (16 x 128) V=32000 fp32
    python -m bench.bench_policy_loss --device cuda  # N=8192 (32 x 256) V=151936 bf16
    python -m bench.bench_policy_loss --size N=64,V=1000 --isa here  # one toy case (gpu.sh --dry-run)

alignops      = ao.fused_policy_loss(logits, labels, ..., method="grpo", kl_coef, entropy_coef):
                token_stats forward (one read of the logits), per-token math on [N], one fused
                read + write backward.
alignops+gif  = the same with grad_in_forward=True (backward kernel runs during forward).
eager         = TRL/verl style: logits.float() / T, log_softmax, gather, entropy from the softmax,
                clipped ratio, k3 KL, entropy bonus, token-mean, under autograd.
compile       = torch.compile of that same function.
liger         = Liger-Kernel's logits-in GRPO loss (triton_grpo_loss; no entropy bonus), when
                installed (GPU). Its concatenation of one extra position is part of its timing.

Every row with a bandwidth also has the copy floor: `dst.copy_(logits)` timed in the same process
(copy_GB/s), and the row's GB/s as a percentage of it (%_of_copy).
"""

from __future__ import annotations


import torch

import alignops as ao
from bench.harness import Case, bench_main, lazy_compile

TEMPERATURE = 0.9
CLIP = 0.2
KL_COEF = 0.04
ENT_COEF = 0.01


def eager_grpo(logits, labels, old_logp, ref_logp, adv, mask):
    """What a trainer writes today (TRL's GRPOTrainer / verl's dp_actor, condensed)."""
    logits = logits.float() / TEMPERATURE
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    a = adv.unsqueeze(-1)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP))
    u = ref_logp - logp
    kl = torch.expm1(u) - u
    per_token = pg + KL_COEF * kl - ENT_COEF * entropy
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp(min=1)


def make_case(b, t, v, dtype, device, backend=None):
    cache = {}

    def make_inputs():
        # drawn once per case (an [8192, 151936] draw takes seconds on the CPU) and shared: no
        # implementation writes its inputs (Liger's in-place gradient goes to its concatenated copy)
        if cache:
            return dict(cache)
        g = torch.Generator(device="cpu").manual_seed(0)
        logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype=dtype, device=device)
        labels = torch.randint(0, v, (b, t), generator=g).to(device)
        with torch.no_grad():
            logp = torch.log_softmax(logits.float() / TEMPERATURE, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        old = (logp + 0.1 * torch.randn(b, t, generator=g).to(device)).contiguous()
        ref = (logp + 0.1 * torch.randn(b, t, generator=g).to(device)).contiguous()
        adv = torch.randn(b, generator=g).to(device)
        mask = (torch.rand(b, t, generator=g) > 0.1).to(device)
        cache.update(logits=logits, labels=labels, old=old, ref=ref, adv=adv, mask=mask)
        return dict(cache)

    def fused(x, **kw):
        return ao.fused_policy_loss(x["logits"], x["labels"], x["old"], x["adv"], x["mask"], method="grpo",
                                    temperature=TEMPERATURE, clip_low=CLIP, ref_logp=x["ref"], kl_coef=KL_COEF,
                                    kl_estimator="k3", entropy_coef=ENT_COEF, backend=backend, **kw).loss

    compiled = lazy_compile(eager_grpo)
    impls = {
        "alignops": fused,
        "alignops+gif": lambda x: fused(x, grad_in_forward=True),
        "eager": lambda x: eager_grpo(x["logits"], x["labels"], x["old"], x["ref"], x["adv"], x["mask"]),
        "compile": lambda x: compiled(x["logits"], x["labels"], x["old"], x["ref"], x["adv"], x["mask"]),
    }
    if device == "cuda":
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: PLC0415
        except Exception as e:  # noqa: BLE001 - a peer that does not import is left out, not fatal
            if not isinstance(e, ImportError):
                print(f"  liger left out: {type(e).__name__}: {str(e)[:200]}")
            triton_grpo_loss = None
        if triton_grpo_loss is not None:
            def liger(x):
                # Liger takes the logits of T + 1 positions (the last is dropped inside) and returns
                # per-token losses first; the mean over the mask is the token-mean loss.
                logits = torch.cat([x["logits"], x["logits"][:, -1:]], 1)
                out = triton_grpo_loss(logits, x["old"], x["ref"], x["labels"], x["adv"], x["mask"].int(),
                                       temperature=TEMPERATURE, beta=KL_COEF, eps_low=CLIP, eps_high=CLIP,
                                       inplace=True)
                per_token = out[0] if isinstance(out, tuple) else out
                m = x["mask"].float()
                return (per_token * m).sum() / m.sum()
            impls["liger(no entropy)"] = liger
    elem = torch.finfo(dtype).bits // 8
    nbytes = b * t * v * elem
    name = f"N={b * t} V={v} {str(dtype).replace('torch.', '')}"
    return Case(name, {"N": b * t, "V": v, "dtype": str(dtype).replace("torch.", ""), "device": device},
                make_inputs, impls, grad_inputs=("logits",),
                bytes_moved={"fwd": nbytes, "bwd": 2 * nbytes, "fwd+bwd": 3 * nbytes}, copy_input="logits")


def cases_for(device: str, quick: bool = False, size: dict | None = None):
    if size:  # --size N=..,V=..[,T=..]: one case of B = N / T sequences of T tokens (T: min(256, N))
        t = size.get("T", min(256, size["N"]))
        return [make_case(max(1, size["N"] // t), t, size["V"], torch.bfloat16 if device == "cuda" else torch.float32,
                          device)]
    if device == "cuda":
        shapes = [(32, 256, 151936)] if not quick else [(8, 128, 151936)]
        return [make_case(b, t, v, torch.bfloat16, device) for b, t, v in shapes]
    shapes = [(16, 128, 32000)] if not quick else [(8, 64, 32000)]  # 256 rows: see bench_token_logprobs
    return [make_case(b, t, v, torch.float32, device) for b, t, v in shapes]


def main(argv=None):
    return bench_main("policy_loss", __doc__, cases_for, argv, reps=5)


if __name__ == "__main__":
    main()
