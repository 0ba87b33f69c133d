"""The logits pass's kernels: the contract every backend implements, and its torch.library ops.

Forward reads each row of logits once (online max / sum-exp in fp32) and returns per-token
`logp`, `lse` and `entropy`. Backward reads each row once more and writes the gradient once:

    dL/dz_v = a * (1[v = y] - p_v) - b * p_v * (z_v - lse + H),   z = logits / T,

with a = dL/dlogp and b = dL/dH, then divided by the temperature T. The same backward serves every
method: the policy losses only change how a and b are computed.

Kernel contract (every backend in the registry of alignops._backend implements it; the torch one
is alignops/reference/token_stats.py):

    token_stats_fwd(logits, labels, inv_temperature, ignore_index, compute_entropy, logp, lse, entropy)
    token_stats_bwd(logits, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                    ignore_index, has_entropy_grad, grad_logits)

    logits       [B, T, V], fp32/fp16/bf16 (torch and cpu: also fp64), any strides with stride(2) == 1
    labels       [B*T] int64, contiguous; row n is (b, t) = divmod(n, T)
    logp/lse/entropy, grad_logp/grad_entropy
                 [B*T] contiguous, fp32 (fp64 for fp64 logits)
    grad_logits  [B, T, V] in the logits' dtype, any strides with stride(2) == 1; may alias logits
    A row whose label is ignore_index is not read: logp = lse = entropy = 0 and its gradient is 0.
    A label outside [0, V) gives logp = NaN, never an out-of-bounds read.
    Precision (both matter for logits shifted by +-1000, where lse's fp32 ulp is ~1e-4):
    forward computes logp = (z_y - max) - log(sum exp(z - max)), never z_y - lse; backward
    rebuilds log p_v = (z_v - z_y) + logp (z_v - lse only when z_y or logp is not finite).
    Entropy is written as 0 when compute_entropy is false. p_v = 0 (logit -inf) contributes 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignops import _backend
from alignops.layout import compute_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# how backend fallback warnings name the ops of the logits pass (one warning for all of them)
LOGITS_OPS = "the logits-pass ops"


def stat_rows(n: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    """Empty (logp, lse, entropy) rows for n tokens of logits of `dtype`."""
    logp = torch.empty(n, dtype=compute_dtype(dtype), device=device)
    return logp, torch.empty_like(logp), torch.empty_like(logp)


def stats_forward(logits3: Tensor, labels: Tensor, temperature: float, ignore_index: int, compute_entropy: bool,
                  backend: str, out: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, entropy) of every row of `logits3` [B, T, V] for flat int64 `labels`, written into
    `out` (three contiguous rows, e.g. one tile's slices of the call's rows) or into new rows."""
    logp, lse, entropy = stat_rows(labels.numel(), logits3.dtype, logits3.device) if out is None else out
    if labels.numel():
        _backend.kernel("token_stats_fwd", backend)(logits3, labels, 1.0 / temperature, ignore_index,
                                                    compute_entropy, logp, lse, entropy)
    return logp, lse, entropy


def stats_backward(logits3: Tensor, labels: Tensor, logp: Tensor, lse: Tensor, entropy: Tensor, a: Tensor,
                   b: Tensor | None, temperature: float, ignore_index: int, backend: str, out: Tensor) -> None:
    """dL/dlogits into `out` (may alias logits3) for a = dL/dlogp and b = dL/dH (None: no entropy term)."""
    if labels.numel():
        a = a.contiguous()
        _backend.kernel("token_stats_bwd", backend)(logits3, labels, logp, lse, entropy, a,
                                                    a if b is None else b.contiguous(), 1.0 / temperature,
                                                    ignore_index, b is not None, out)


def as_rows(logits: Tensor) -> Tensor:
    """[N, V] or [B, T, V] -> a [B, T, V] view with unit stride over V (copies only otherwise)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.unsqueeze(0) if logits.dim() == 2 else logits


# --------------------------------------------------------------------------------------------
# torch.library ops: schema, fake kernel and autograd, so torch.compile(fullgraph=True) traces
# through them. The backend is resolved before the call and passed as a string.


@torch.library.custom_op("alignops::token_stats", mutates_args=())
def token_stats_op(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                   compute_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return stats_forward(logits, labels, temperature, ignore_index, compute_entropy, backend)


@token_stats_op.register_fake
def _(logits, labels, temperature, ignore_index, compute_entropy, backend):
    out = logits.new_empty(labels.shape, dtype=compute_dtype(logits.dtype))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("alignops::token_stats_backward", mutates_args=())
def token_stats_backward_op(logits: Tensor, labels: Tensor, logp: Tensor, lse: Tensor, entropy: Tensor,
                            grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                            ignore_index: int, has_entropy_grad: bool, backend: str) -> Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    stats_backward(logits, labels, logp, lse, entropy, grad_logp, grad_entropy if has_entropy_grad else None,
                   temperature, ignore_index, backend, grad_logits)
    return grad_logits


@token_stats_backward_op.register_fake
def _(logits, labels, logp, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      has_entropy_grad, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy, backend = inputs
    logp, lse, entropy = output
    ctx.save_for_backward(logits, labels, logp, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
    ctx.compute_entropy = compute_entropy


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, labels, logp, lse, entropy = ctx.saved_tensors
    # Upstream gradients may arrive expanded (stride 0); the kernels take contiguous rows.
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.contiguous()
    has_entropy_grad = ctx.compute_entropy and grad_entropy is not None
    grad_entropy = grad_entropy.contiguous() if has_entropy_grad else grad_logp
    grad_logits = token_stats_backward_op(
        logits, labels, logp, lse, entropy, grad_logp, grad_entropy, ctx.temperature,
        ctx.ignore_index, has_entropy_grad, ctx.backend)
    return grad_logits, None, None, None, None, None


token_stats_op.register_autograd(_backward, setup_context=_setup_context)
