"""Token log-probs and entropy from logits: the logits pass every objective in alignops stands on.

Forward reads each row of logits once (online max / sum-exp in fp32) and returns per-token
`logp`, `lse` and `entropy`. Backward reads each row once more and writes the gradient once:

    dL/dz_v = a * (1[v = y] - p_v) - b * p_v * (z_v - lse + H),   z = logits / T,

with a = dL/dlogp and b = dL/dH, then divided by the temperature T. The same backward serves every
method: the policy losses only change how a and b are computed.

Kernel contract (every backend in the registry of alignops._backend implements it):

    token_stats_fwd(logits, labels, inv_temperature, ignore_index, compute_entropy, logp, lse, entropy)
    token_stats_bwd(logits, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                    ignore_index, has_entropy_grad, grad_logits)

    logits       [B, T, V], fp32/fp16/bf16 (cpu: also fp64), any strides with stride(2) == 1
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

import math

import torch
from torch import Tensor

from alignops import _backend
from alignops.reference import token_stats as reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# how backend fallback warnings name the ops of the logits pass (one warning for all of them)
LOGITS_OPS = "the logits-pass ops"


def _stats_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# torch.library ops: schema, fake kernel and autograd, so torch.compile(fullgraph=True) traces
# through them. The backend is resolved before the call and passed as a string.


@torch.library.custom_op("alignops::token_stats", mutates_args=())
def token_stats_op(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
                   compute_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    n = labels.numel()
    out_dtype = _stats_dtype(logits.dtype)
    logp = torch.empty(n, dtype=out_dtype, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp)
    if n:
        _backend.kernel("token_stats_fwd", backend)(
            logits, labels, 1.0 / temperature, ignore_index, compute_entropy, logp, lse, entropy)
    return logp, lse, entropy


@token_stats_op.register_fake
def _(logits, labels, temperature, ignore_index, compute_entropy, backend):
    out = logits.new_empty(labels.shape, dtype=_stats_dtype(logits.dtype))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("alignops::token_stats_backward", mutates_args=())
def token_stats_backward_op(logits: Tensor, labels: Tensor, logp: Tensor, lse: Tensor, entropy: Tensor,
                            grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                            ignore_index: int, has_entropy_grad: bool, backend: str) -> Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if labels.numel():
        _backend.kernel("token_stats_bwd", backend)(
            logits, labels, logp, lse, entropy, grad_logp, grad_entropy, 1.0 / temperature,
            ignore_index, has_entropy_grad, grad_logits)
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


# --------------------------------------------------------------------------------------------
# argument checks


def check_logits_labels(logits, labels, *, name_logits="logits", name_labels="labels"):
    """Validate shapes, dtypes and devices. Returns labels as a flat int64 tensor."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name_logits} must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name_labels} must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name_logits} must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name_logits} must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name_logits} has an empty vocabulary (V = 0)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name_labels} must be an integer tensor (int64 or int32), got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{name_labels} shape {tuple(labels.shape)} does not match "
                         f"{name_logits} shape {tuple(logits.shape)} without its last dimension")
    if labels.device != logits.device:
        raise ValueError(f"{name_labels} is on {labels.device} but {name_logits} is on {logits.device}")


def check_label_range(labels: Tensor, vocab: int, ignore_index: int, name="labels"):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {first}")


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def as_rows(logits: Tensor) -> Tensor:
    """[N, V] or [B, T, V] -> a [B, T, V] view with unit stride over V (copies only otherwise)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.unsqueeze(0) if logits.dim() == 2 else logits


# --------------------------------------------------------------------------------------------
# public API


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False, backend: str | None = None,
                   check_finite: bool = False, validate_labels: bool | None = None,
                   vocab_process_group=None, vocab_start: int | None = None):
    """Log-probability of each label under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: `[N, V]` or `[B, T, V]`, float32 / bfloat16 / float16 (float64 on the torch and cpu
            backends). Any strides; the vocabulary dimension should have unit stride (else copied).
        labels: integer tensor of shape `logits.shape[:-1]`; `ignore_index` marks positions to skip.
        temperature: the logits are divided by it inside the kernel (use the rollout temperature).
        return_entropy: also return the entropy of softmax(logits / temperature) per position.
        backend: "torch", "cpu", "triton", "cuda" or None (automatic; see alignops._backend).
        check_finite: raise ValueError if logits hold NaN or inf (costs a reduction and a sync).
        validate_labels: check labels lie in [0, V); default: only for CPU tensors, where it costs
            no device synchronisation. Unchecked out-of-range labels give NaN log-probs.
        vocab_process_group: a torch.distributed group over which the vocabulary is sharded:
            `logits` are this rank's contiguous slice `[..., V_r]` (rank order), `labels` global ids,
            the same on every rank. One all_gather forward, none backward (alignops/vocab_parallel.py).
        vocab_start: this rank's first token id (the lower ranks' V_r summed); None gathers the sizes.

    Returns:
        `logp` (and `entropy`), float32 (float64 for float64 logits), shaped like `labels`.
        Ignored positions hold 0 and receive no gradient. Both outputs are differentiable,
        separately and together; backward is one fused pass over the logits.
    """
    check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Data-dependent checks cannot be traced by torch.compile: label checks are skipped there and
    # check_finite becomes an asynchronous device assert.
    compiling = torch.compiler.is_compiling()
    if validate_labels is None:
        validate_labels = labels.device.type == "cpu" and not compiling
    if vocab_process_group is not None or vocab_start is not None:
        return _sharded_token_logprobs(logits, labels, temperature, ignore_index, return_entropy, backend,
                                       check_finite, validate_labels, vocab_process_group, vocab_start)
    if validate_labels:
        check_label_range(labels, logits.shape[-1], ignore_index)
    if check_finite:
        if compiling:
            torch._assert_async(torch.isfinite(logits).all(), "logits contain NaN or inf (check_finite=True)")
        elif not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or inf (check_finite=True)")

    backend = _backend.resolve_backend(backend, logits.device, what=LOGITS_OPS)
    if backend == "torch":
        logp, entropy = reference.token_logprobs(logits, labels, temperature, ignore_index, return_entropy)
        return (logp, entropy) if return_entropy else logp
    if logits.dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"logits of dtype float64 are supported by the torch and cpu backends, not {backend!r}")

    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, _, entropy = token_stats_op(as_rows(logits), flat_labels, temperature, ignore_index,
                                      return_entropy, backend)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def _sharded_token_logprobs(logits, labels, temperature, ignore_index, return_entropy, backend, check_finite,
                            validate_labels, vocab_process_group, vocab_start):
    from alignops import vocab_parallel  # noqa: PLC0415

    vocab_parallel.check_group_args(vocab_process_group, vocab_start)
    backend = _backend.resolve_backend(backend, logits.device, what=LOGITS_OPS)
    if logits.dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"logits of dtype float64 are supported by the torch and cpu backends, not {backend!r}")
    logits3 = as_rows(logits)
    shard = vocab_parallel.resolve_shard(vocab_process_group, vocab_start, logits.shape[-1], logits.device)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = vocab_parallel.ShardedTokenStats.apply(logits3, flat_labels, shard, temperature, ignore_index,
                                                           bool(return_entropy), backend, bool(validate_labels),
                                                           bool(check_finite), False)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp
