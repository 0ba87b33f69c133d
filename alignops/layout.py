"""Token layouts shared by every op and by the trainer: rows, cu_seqlens, masks and normalisers.

Two layouts carry the same tokens (docs/design.md §4):
    padded  `[B, T]` token tensors (and `[B, T, V]` logits), row i = batch row i;
    packed  `[N]` token tensors (and `[N, V]` logits) with `cu_seqlens = [B + 1]` row offsets,
            row i = tokens cu_seqlens[i] : cu_seqlens[i + 1].
A token counts iff its mask is set; masks are bool (or 0/1) tensors shaped like the tokens, and any
other value is an error (check_mask: always on CPU tensors, on GPU ones with validate_mask=True).

The aggregation modes and their default normalisers are docs/methods.md §1.6 and §00.2: the
normaliser is the whole optimiser step's count, so a micro-batched step passes the value of
`step_normalizer` on the whole step's mask and divides by exactly what one big call would.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for every input dtype (docs/methods.md R3), fp64 for fp64 inputs (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# checks


def check_cu_seqlens(cu_seqlens, n_tokens: int, device, name: str = "cu_seqlens") -> Tensor:
    """Validated int64 row offsets `[B + 1]`. Values are checked only for CPU tensors (a check of
    device values would synchronise the host) and not under torch.compile."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-D [B + 1] tensor, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"{name} is on {cu_seqlens.device} but the tokens are on {device}")
    cu = cu_seqlens.to(torch.int64).contiguous()
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        values = cu.tolist()
        if values[0] != 0 or values[-1] != n_tokens or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must start at 0, never decrease and end at N={n_tokens}; "
                             f"got {values[:8]}{'...' if len(values) > 8 else ''}")
    return cu


def check_mask(mask, shape=None, device=None, name: str = "mask", *, validate: bool | None = None,
               weights: str | None = None) -> Tensor | None:
    """None, or `mask` as a bool tensor (`mask` itself when it is bool, else `mask != 0`).

    Masks are masks: a bool tensor is taken as it is; an integer or floating-point one must hold
    only 0 and 1 (NaN is an error too). The values are checked on CPU tensors by default (cheap, no
    device synchronisation) and on any device with validate=True (on a GPU that costs a host sync);
    validate=False skips the check. Under torch.compile the default skips it and validate=True
    asserts on the device. `shape` and `device`, when given, are checked too. `weights` completes
    the error for a non-0/1 value: where this op takes weights instead (e.g. POLICY_MASK_WEIGHTS)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1, got {mask.dtype}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match the token shape {tuple(shape)}")
    if device is not None and mask.device != torch.device(device):
        raise ValueError(f"{name} is on {mask.device} but the tokens are on {device}")
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate_mask must be True, False or None, got {type(validate).__name__}")
    if mask.dtype == torch.bool:
        return mask
    _check_zero_one(mask, name, validate, weights)
    return mask != 0


def _check_zero_one(mask: Tensor, name: str, validate: bool | None, weights: str | None) -> None:
    compiling = torch.compiler.is_compiling()
    if validate is None:
        validate = mask.device.type == "cpu" and not compiling
    if not validate or mask.numel() == 0:
        return
    bad = (mask != 0) & (mask != 1)  # NaN compares unequal to both
    if compiling:
        torch._assert_async(~bad.any(), f"{name} must hold only 0 and 1 (or False/True) (validate_mask=True)")
        return
    if not bool(bad.any()):
        return
    where = tuple(int(i) for i in bad.nonzero()[0])
    value = mask[where].item()
    at = where[0] if len(where) == 1 else where
    msg = f"{name} must hold only 0 and 1 (or False/True), found {value} at index {at}"
    if math.isfinite(value):
        msg += "; a mask is not a weight" + (f": {weights}" if weights else "")
    raise ValueError(msg)


def token_mask(mask, shape, device, name: str = "mask", *, validate: bool | None = None,
               weights: str | None = None) -> Tensor:
    """check_mask, with None meaning every token."""
    checked = check_mask(mask, shape, device, name, validate=validate, weights=weights)
    return torch.ones(tuple(shape), dtype=torch.bool, device=device) if checked is None else checked


# Where the policy losses take per-token weights: the end of their mask errors (check_mask(weights=)).
POLICY_MASK_WEIGHTS = "per-token weights go in rollout_is_weights="


# --------------------------------------------------------------------------------------------
# rows


class Rows:
    """The row structure of token tensors: per-row sums and row-to-token broadcasts.

    `cu_seqlens` None: the padded layout, rows along the last dim of `token_shape` [B, T].
    Otherwise the packed layout of `token_shape` [N] (pass validated offsets, see check_cu_seqlens).
    """

    def __init__(self, token_shape, device, cu_seqlens: Tensor | None = None):
        self.token_shape = torch.Size(token_shape)
        self.device = torch.device(device)
        self.packed = cu_seqlens is not None
        if self.packed:
            self._offsets = cu_seqlens.to(device=self.device, dtype=torch.int64)
            self.num_rows = self._offsets.numel() - 1
        else:
            self._offsets = None
            self.num_rows = self.token_shape[0]
        self._row_ids = None

    @property
    def offsets(self) -> Tensor:
        """int64 [B + 1] row offsets into the flattened tokens (cu_seqlens for both layouts)."""
        if self._offsets is None:
            b, t = self.token_shape
            self._offsets = torch.arange(b + 1, device=self.device, dtype=torch.int64) * t
        return self._offsets

    @property
    def row_ids(self) -> Tensor:
        """int64 [number of tokens]: the row of each token of the flattened layout."""
        if self._row_ids is None:
            n = math.prod(self.token_shape)
            # token n lies in row i iff offsets[i] <= n < offsets[i+1]: count the row ends <= n.
            self._row_ids = torch.searchsorted(self.offsets[1:], torch.arange(n, device=self.device), right=True)
        return self._row_ids

    def row_sum(self, x: Tensor) -> Tensor:
        if not self.packed:
            return x.sum(-1)
        # segment_reduce, not index_add: index_add uses float atomics on CUDA (non-deterministic).
        return torch.segment_reduce(x, "sum", offsets=self._offsets, axis=0, unsafe=True)

    def to_tokens(self, per_row: Tensor) -> Tensor:
        if not self.packed:
            return per_row.unsqueeze(-1).expand(self.token_shape)
        return per_row.index_select(0, self.row_ids)

    def lengths(self, mask: Tensor, dtype=torch.int64) -> Tensor:
        """Masked-in tokens per row."""
        return self.row_sum(mask.to(dtype))

    def row_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """Per-row mean over masked-in tokens; an empty row's mean is 0 (its length is clamped to 1)."""
        return self.row_sum(x) / self.lengths(mask, x.dtype).clamp(min=1)


def sanitize(x: Tensor | None, mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """x in the compute dtype with masked-out positions replaced by 0 (gradient 0 there too), so
    padding never reaches an exp whose inf would turn into a NaN gradient (0 * inf)."""
    if x is None:
        return None
    x = x.to(dtype)
    return torch.where(mask, x, torch.zeros((), dtype=dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# aggregation and normalisers (docs/methods.md §1.6, §00.2)


def check_agg(agg) -> str:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    return agg


def default_normalizer(agg: str, mask: Tensor, rows: Rows, max_len: float | None, dtype) -> Tensor:
    """The aggregation's denominator from `mask`; empty rows are never counted."""
    if agg == "token-mean":
        return mask.sum().to(dtype)
    nonempty_rows = (rows.lengths(mask, dtype) > 0).sum().to(dtype)
    if agg == "seq-mean-token-sum-norm":
        return nonempty_rows * max_len
    return nonempty_rows


def step_normalizer(agg: str, mask: Tensor, max_len: float | None = None, cu_seqlens: Tensor | None = None,
                    dtype=torch.float32) -> Tensor:
    """The denominator of one optimiser step: default_normalizer on the whole step's mask. Pass it
    as `normalizer=` to every micro-batch's loss so their sum is the whole step's loss."""
    check_agg(agg)
    if agg == "seq-mean-token-sum-norm" and max_len is None:
        raise ValueError("agg='seq-mean-token-sum-norm' needs max_len (the constant C)")
    valid = mask != 0
    return default_normalizer(agg, valid, Rows(valid.shape, valid.device, cu_seqlens), max_len, dtype)


def check_normalizer(normalizer, device, name: str = "normalizer"):
    """None, a float >= 0, or a scalar tensor reshaped to 0-dim on `device`."""
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(normalizer.shape)}")
        return normalizer.reshape(()).to(device)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"{name} must be a number, a scalar tensor or None, got {type(normalizer).__name__}")
    if not (math.isfinite(normalizer) and normalizer >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {normalizer}")
    return float(normalizer)


def inverse_normalizer(normalizer, default: Tensor, name: str = "normalizer") -> Tensor:
    """1 / normalizer (`default` when None) as a tensor like `default`, exactly 0 for a zero
    normaliser (the loss is then 0 with a zero gradient)."""
    normalizer = check_normalizer(normalizer, default.device, name)
    denom = default if normalizer is None else torch.as_tensor(normalizer, dtype=default.dtype, device=default.device)
    positive = denom > 0
    return torch.where(positive, 1.0 / torch.where(positive, denom, torch.ones_like(denom)), torch.zeros_like(denom))


def aggregate(x: Tensor, mask: Tensor, rows: Rows, agg: str, normalizer) -> Tensor:
    """Agg(x) = numerator / normalizer; a zero normaliser gives exactly 0 with a zero gradient."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(mask, x, zero)
    if agg == "seq-mean-token-mean":
        numerator = (rows.row_sum(x) / rows.lengths(mask, x.dtype).clamp(min=1)).sum()
    else:
        numerator = x.sum()
    norm = torch.as_tensor(normalizer, dtype=x.dtype, device=x.device)
    positive = norm > 0
    # divide by a safe denominator first: where() alone would route 0 * (1/0) = NaN into backward
    return torch.where(positive, numerator / torch.where(positive, norm, torch.ones_like(norm)), zero)


def token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked-in tokens, 0 when there are none (the metrics' reduction)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(mask, x, zero).sum() / mask.sum().clamp(min=1).to(x.dtype)


# --------------------------------------------------------------------------------------------
# token tensors


def check_like(name: str, x, like: Tensor, *, floating: bool = True) -> Tensor | None:
    """None, or `x` checked to have the token shape and device of `like`."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have the token shape {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the tokens are on {like.device}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def per_token(name: str, x, like: Tensor, rows: Rows) -> Tensor:
    """`x` per sequence `[B]` (broadcast over its row) or per token like `like`, as a token tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the tokens are on {like.device}")
    if tuple(x.shape) == tuple(like.shape):
        return x
    if tuple(x.shape) == (rows.num_rows,):
        return rows.to_tokens(x)
    raise ValueError(f"{name} must be per sequence [{rows.num_rows}] or per token {tuple(like.shape)}, "
                     f"got {tuple(x.shape)}")


def token_layout(name: str, x: Tensor, cu_seqlens) -> Rows:
    """The Rows of token tensor `x`: `[B, T]`, or packed `[N]` with cu_seqlens (checked)."""
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must be [B, T] (or packed [N] with cu_seqlens), got shape {tuple(x.shape)}")
        return Rows(x.shape, x.device)
    if x.dim() != 1:
        raise ValueError(f"with cu_seqlens, {name} must be packed [N], got shape {tuple(x.shape)}")
    return Rows(x.shape, x.device, check_cu_seqlens(cu_seqlens, x.shape[0], x.device))
