"""Argument handling and batch moments shared by the estimator families of alignops.advantages."""

from __future__ import annotations

import torch
from torch import Tensor

from alignops import _backend, layout


def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _float_tensor(x, name: str) -> Tensor:
    """fp32 for bool/int/fp16/bf16/fp32 input, fp64 for fp64 input (statistics never in bf16)."""
    x = _tensor(x, name)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be real, got {x.dtype}")
    return x.to(layout.compute_dtype(x.dtype))


# The advantage ops have torch, cpu and triton kernels (no cuda kernel): on CUDA tensors without
# triton the automatic choice is the torch backend, still on the GPU, with a one-time warning
# naming why triton cannot run; a named "cuda" is an error.
_ADVANTAGE_BACKENDS = ("torch", "cpu", "triton")


def _resolve(backend: str | None, device: torch.device) -> str:
    return _backend.resolve_backend(backend, device, supported=_ADVANTAGE_BACKENDS, what="the advantage ops")


def _same_device(x: Tensor, device, name: str, other: str = "the rewards") -> Tensor:
    if x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device} but {other} are on {device}")
    return x


def _check_nonnegative(x: Tensor, name: str) -> None:
    """Values >= 0 (NaN passes), checked on CPU tensors only, like masks (no device synchronisation)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if bool((x < 0).any()):
        raise ValueError(f"{name} must be >= 0, found {x[x < 0][0].item()}")


def _check_finite(x: Tensor, name: str, allow_nan: bool) -> None:
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return  # a data-dependent check would synchronise the device
    bad = torch.isinf(x) if allow_nan else ~torch.isfinite(x)
    if bool(bad.any()):
        what = "infinite values" if allow_nan else "NaN or infinite values"
        raise ValueError(f"{name} contains {what}" + (" (NaN marks an unscorable reward)" if allow_nan else ""))


def _rewards(rewards, name="rewards") -> Tensor:
    r = _float_tensor(rewards, name)
    if r.dim() != 1:
        raise ValueError(f"{name} must be a 1-d [B] tensor, got shape {tuple(r.shape)}")
    _check_finite(r, name, allow_nan=True)
    return r.contiguous()


def _row_lengths(mask, lengths, num_rows: int, device, validate_mask, required: bool) -> Tensor | None:
    """Per-row token counts as float64 [B]: `mask` [B, T] (bool or 0/1) summed, or `lengths` [B]
    (any non-negative per-row weights); exactly one of them, or neither when not `required` (None)."""
    if mask is None and lengths is None:
        if required:
            raise ValueError("give exactly one of mask [B, T] or lengths [B] (the rows' token counts)")
        return None
    if mask is not None and lengths is not None:
        raise ValueError("give exactly one of mask [B, T] or lengths [B], not both")
    if mask is not None:
        m = _tensor(mask, "mask")
        if m.dim() != 2 or m.shape[0] != num_rows:
            raise ValueError(f"mask must be [B, T] with B={num_rows}, got shape {tuple(m.shape)}")
        return layout.check_mask(m, device=device, name="mask", validate=validate_mask,
                                 weights="per-row token counts go in lengths= [B]").sum(-1).double()
    w = _float_tensor(lengths, "lengths").double()
    if w.shape != (num_rows,):
        raise ValueError(f"lengths must be [B]={num_rows}, got shape {tuple(w.shape)}")
    _same_device(w, device, "lengths")
    _check_finite(w, "lengths", allow_nan=False)
    _check_nonnegative(w, "lengths")
    return w


# --------------------------------------------------------------------------------------------
# batch moments (merged over ranks with alignops.distributed.merge_moments)


def _local_moments(x: Tensor, w: Tensor) -> Tensor:
    """Weighted (total weight, mean, M2) of float64 x, two passes; rows with w = 0 are ignored
    even when x holds NaN there."""
    used = w > 0
    x = torch.where(used, x, 0.0)
    n = w.sum()
    mean = (w * x).sum() / n.clamp_min(1)
    dev = torch.where(used, x - mean, 0.0)
    return torch.stack([n, mean, (w * dev * dev).sum()])


def _var(n: Tensor, m2: Tensor, unbiased: bool) -> Tensor:
    denom = (n - 1) if unbiased else n
    return torch.where(denom > 0, m2 / denom.clamp_min(1e-300), 0.0)
