"""Triton kernels of the logits pass: per-token log-prob, log-sum-exp and entropy, and the fused
backward. The launchers follow the kernel contract in alignops/token_stats.py exactly.

Layout: one program per row of the [B, T, V] logits view (row n = b*T + t, found through the
view's own strides), looping over the vocabulary in tiles of BLOCK_V. The grid is 1-D and capped;
a program loops over rows when N exceeds the cap, so no grid dimension outgrows hardware limits.

Precision choices (all learned on logits shifted by +-1000, where fp32's ulp is ~6e-5):
- Every difference of logits is taken in *raw* units and only then scaled by 1/temperature:
  (x_v - x_ref) * inv_temp rather than x_v * inv_temp - z_ref. The raw difference is exact for
  nearby values, and the expression has no multiply-then-subtract that the compiler could contract
  into an FMA with a differently rounded operand (which would make exp(z_max - z_max) != 1).
- The running statistics are s = sum exp(z - m) and t = sum exp(z - m) * (z - m) relative to the
  running max m (csrc/common/softmax_stats.h), so H = log s - t/s never subtracts two numbers of
  size ~1000.
- Backward rebuilds log p_v = (x_v - x_y) * inv_temp + logp_y from the label's logit and the saved
  logp, which is exact at v = y; it falls back to z_v - lse when x_y or logp is not finite.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from alignops._backend import triton_interpreted as _interpreted

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
# CUDA allows 2^31 - 1 programs along grid x; staying far below keeps launches cheap to reason
# about, and the row loop inside each program covers any N.
_MAX_PROGRAMS = 1 << 20


def _launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) by heuristic; no autotuning (it would sync and vary run to run)."""
    if _interpreted():
        # Small tiles make interpreted tests cross many tile boundaries while staying fast.
        return min(triton.next_power_of_2(V), 256), 1
    block_v = min(triton.next_power_of_2(V), 8192)
    # ~16 elements per thread: two 16-byte loads of bf16 per tile, enough bytes in flight per SM
    # to stay bandwidth-bound, without spilling the fp32 temporaries.
    num_warps = max(1, min(16, block_v // 512))
    return block_v, num_warps


@triton.jit
def row_softmax_stats(row_ptr, read_len, V, INV_TEMP: tl.constexpr, NEED_T: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """Softmax statistics of one row, tile by tile: m is the running max in raw (un-tempered)
    units, s = sum exp((x - m)/T) and t = sum exp((x - m)/T) * (x - m)/T relative to it.
    Elements at or past read_len are not loaded (read_len = 0 reads nothing)."""
    cols_in_tile = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    t = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols_in_tile
        x = tl.load(row_ptr + cols, mask=cols < read_len, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, 0))
        # A row (so far) made only of -inf has no finite max: measure from 0 instead so that
        # -inf - (-inf) never appears; every term is then exp(-inf) = 0.
        ref = tl.where(new_m == float("-inf"), 0.0, new_m)
        d = (x - ref) * INV_TEMP
        e = tl.exp(d)
        d_old = (m - ref) * INV_TEMP
        scale_old = tl.exp(d_old)
        if NEED_T:
            # e == 0 exactly where d == -inf (masked tail, -inf logits), and likewise scale_old == 0
            # where m == -inf (s = t = 0): zero the -inf before it meets a 0, since 0 * -inf is NaN.
            t_tile = tl.sum(e * tl.where(e > 0.0, d, 0.0), 0)
            t = scale_old * (t + tl.where(scale_old > 0.0, d_old, 0.0) * s) + t_tile
        s = s * scale_old + tl.sum(e, 0)
        m = new_m
    return m, s, t


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, entropy_ptr,
    N, T, V, stride_b, stride_t, ignore_index,
    INV_TEMP: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols_in_tile = tl.arange(0, BLOCK_V)
    for row32 in range(pid, N, num_programs):
        row = tl.cast(row32, tl.int64)
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            # Not read at all: an ignored row may hold anything (all -inf, NaN, stale memory).
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
        else:
            row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
            m, s, t = row_softmax_stats(row_ptr, V, V, INV_TEMP, COMPUTE_ENTROPY, BLOCK_V)
            log_s = tl.log(s)
            m_z = m * INV_TEMP
            tl.store(lse_ptr + row, m_z + log_s)
            in_range = (label >= 0) & (label < V)
            x_label = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
            # (x_y - m) * inv_temp - log s, not z_y - lse: lse ~ 1000 would swamp a small logp.
            logp = (x_label - m) * INV_TEMP - log_s
            tl.store(logp_ptr + row, tl.where(in_range, logp, float("nan")))
            if COMPUTE_ENTROPY:
                tl.store(entropy_ptr + row, log_s - t / s)
            else:
                tl.store(entropy_ptr + row, 0.0)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16 rounded to nearest even, by integer arithmetic on the bits.

    Only used under TRITON_INTERPRET=1: the interpreter (seen in triton 3.9) truncates fp32 -> bf16
    casts, while every GPU rounds to nearest; truncation would bias the interpreted gradients
    by up to one bf16 ulp. After this rounding the value is exactly representable, so the final
    cast is exact everywhere.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    # NaN payloads could carry into the sign bit; leave NaN to the plain cast.
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True)).to(tl.bfloat16)


@triton.jit
def _token_stats_bwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_logits_ptr,
    N, T, V, stride_b, stride_t, grad_stride_b, grad_stride_t, ignore_index,
    INV_TEMP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    SOFTWARE_BF16_ROUNDING: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols_in_tile = tl.arange(0, BLOCK_V)
    out_dtype = grad_logits_ptr.dtype.element_ty
    for row32 in range(pid, N, num_programs):
        row = tl.cast(row32, tl.int64)
        label = tl.load(labels_ptr + row)
        grad_row_ptr = grad_logits_ptr + (row // T) * grad_stride_b + (row % T) * grad_stride_t
        if (label == ignore_index) | (label < 0) | (label >= V):
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols_in_tile
                tl.store(grad_row_ptr + cols, tl.zeros([BLOCK_V], dtype=out_dtype), mask=cols < V)
        else:
            row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
            # Read before the tile loop: with an in-place gradient a tile store may overwrite it.
            x_label = tl.load(row_ptr + label).to(tl.float32)
            logp = tl.load(logp_ptr + row)
            lse = tl.load(lse_ptr + row)
            entropy = tl.load(entropy_ptr + row)
            via_label = (tl.abs(x_label) < float("inf")) & (tl.abs(logp) < float("inf"))
            # log p_v = (x_v - x_ref) * inv_temp + offset: via the label (exact at v = y), or
            # z_v - lse when the label's logit or logp is not finite.
            x_ref = tl.where(via_label, x_label, 0.0)
            offset = tl.where(via_label, logp, -lse)
            # The final division by the temperature is folded into the coefficients.
            a = tl.load(grad_logp_ptr + row) * INV_TEMP
            if HAS_ENTROPY_GRAD:
                b = tl.load(grad_entropy_ptr + row) * INV_TEMP
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols_in_tile
                in_row = cols < V
                # Each element is loaded before this program stores to it, so grad_logits may
                # alias the logits.
                x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
                log_p = (x - x_ref) * INV_TEMP + offset
                p = tl.exp(log_p)
                g = tl.where(cols == label, a, 0.0) - a * p
                if HAS_ENTROPY_GRAD:
                    # p == 0 (logit -inf) contributes exactly 0, not 0 * -inf = NaN.
                    g -= b * p * (tl.where(p > 0.0, log_p, 0.0) + entropy)
                if SOFTWARE_BF16_ROUNDING:
                    tl.store(grad_row_ptr + cols, _round_to_bf16(g), mask=in_row)
                else:
                    tl.store(grad_row_ptr + cols, g.to(out_dtype), mask=in_row)


# --------------------------------------------------------------------------------------------
# launchers (signatures: the kernel contract in alignops/token_stats.py)


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _SUPPORTED:
        raise TypeError(f"{name}: the triton backend supports float32, float16 and bfloat16, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must be a [B, T, V] view, got shape {tuple(logits.shape)}")
    if logits.stride(2) != 1 and logits.size(2) > 1:
        raise ValueError(f"{name} must have unit stride over the vocabulary, got strides {logits.stride()}")


def _check_rows(t: torch.Tensor, name: str, n: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != n or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of {n} elements, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")


def _check_inv_temperature(inv_temperature) -> float:
    if isinstance(inv_temperature, bool) or not isinstance(inv_temperature, (int, float)):
        raise TypeError(f"inv_temperature must be a float, got {type(inv_temperature).__name__}")
    inv_temperature = float(inv_temperature)
    if not (inv_temperature > 0 and inv_temperature < float("inf")):
        raise ValueError(f"inv_temperature must be finite and > 0, got {inv_temperature}")
    return inv_temperature


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device's stream; tensors on another device need a switch.
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib  # noqa: PLC0415
    return contextlib.nullcontext()


def token_stats_fwd(logits, labels, inv_temperature, ignore_index, compute_entropy, logp, lse, entropy) -> None:
    """Writes per-row logp, lse and entropy (fp32) of softmax(logits * inv_temperature)."""
    _check_logits(logits)
    B, T, V = logits.shape
    N = B * T
    device = logits.device
    _check_rows(labels, "labels", N, torch.int64, device)
    for name, out in (("logp", logp), ("lse", lse), ("entropy", entropy)):
        _check_rows(out, name, N, torch.float32, device)
    inv_temperature = _check_inv_temperature(inv_temperature)
    if V == 0:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    if N == 0:
        return
    block_v, num_warps = _launch_config(V)
    with _device_guard(device):
        _token_stats_fwd_kernel[(min(N, _MAX_PROGRAMS),)](
            logits, labels, logp, lse, entropy,
            N, T, V, logits.stride(0), logits.stride(1), int(ignore_index),
            INV_TEMP=inv_temperature, COMPUTE_ENTROPY=bool(compute_entropy), BLOCK_V=block_v,
            num_warps=num_warps,
        )


def token_stats_bwd(logits, labels, logp, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                    ignore_index, has_entropy_grad, grad_logits) -> None:
    """Writes dL/dlogits = (a*(1[v=y] - p) - b*p*(log p + H)) * inv_temperature into grad_logits,
    with a = grad_logp, b = grad_entropy (ignored unless has_entropy_grad). grad_logits may alias
    logits."""
    _check_logits(logits)
    _check_logits(grad_logits, "grad_logits")
    B, T, V = logits.shape
    N = B * T
    device = logits.device
    if tuple(grad_logits.shape) != (B, T, V) or grad_logits.dtype != logits.dtype:
        raise ValueError(f"grad_logits must have the logits' shape {(B, T, V)} and dtype {logits.dtype}, "
                         f"got {tuple(grad_logits.shape)} {grad_logits.dtype}")
    if grad_logits.device != device:
        raise ValueError(f"grad_logits is on {grad_logits.device} but logits are on {device}")
    _check_rows(labels, "labels", N, torch.int64, device)
    for name, t in (("logp", logp), ("lse", lse), ("entropy", entropy), ("grad_logp", grad_logp)):
        _check_rows(t, name, N, torch.float32, device)
    has_entropy_grad = bool(has_entropy_grad)
    if has_entropy_grad:
        _check_rows(grad_entropy, "grad_entropy", N, torch.float32, device)
    inv_temperature = _check_inv_temperature(inv_temperature)
    if N == 0:
        return
    block_v, num_warps = _launch_config(V)
    with _device_guard(device):
        _token_stats_bwd_kernel[(min(N, _MAX_PROGRAMS),)](
            logits, labels, logp, lse, entropy, grad_logp,
            grad_entropy if has_entropy_grad else grad_logp,
            grad_logits,
            N, T, V, logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1),
            int(ignore_index),
            INV_TEMP=inv_temperature, HAS_ENTROPY_GRAD=has_entropy_grad, BLOCK_V=block_v,
            SOFTWARE_BF16_ROUNDING=_interpreted() and grad_logits.dtype == torch.bfloat16,
            num_warps=num_warps,
        )
