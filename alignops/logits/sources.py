"""The logits pass's arguments, resolved once per call, and the two sources of its logits tiles.

    args = resolve(tokens, labels, vocab, temperature=..., ignore_index=..., backend=..., ...)
    GivenLogits(logits)                                        one tile: the logits themselves
    LinearHead(hidden, weight, bias, softcap, logit_scale, chunk, shard)
                                                               hidden @ weight.T (+ bias), transformed,
                                                               one chunk of rows at a time

A source yields its tiles `(s, e, tile [1 or B, T, V], deriv)` for the flat tokens s:e, gives the
buffer a tile's gradient dL/dz is written into, and turns those gradients into the gradients of its
own inputs (`inputs`): the logits', or dhidden, dweight and dbias. The passes over a source
(alignops/logits/passes.py) are written once for both.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch
from torch import Tensor

from alignops import _backend
from alignops.logits import vocab_shard
from alignops._validate import check_float
from alignops.logits.kernels import LOGITS_OPS, SUPPORTED_DTYPES, as_rows

# Bytes of one logits tile (fp32): the chunk is the number of rows that fits, but never fewer than
# MIN_ROWS: every chunk re-reads the whole weight and rewrites the whole fp32 dweight, so at
# V = 151936 a 96-row tile made the fused path 2x the bare GEMMs where 512 rows make it ~1.2x
# (bench/results/fused_linear-cpu2.md, docs/benchmarks.md).
TILE_BYTES = 64 << 20
MIN_ROWS = 512
# Bytes of the fp32 copy of a block of weight rows, where the GEMM cannot return fp32 (CPU).
WIDEN_BYTES = 32 << 20


# --------------------------------------------------------------------------------------------
# arguments


@dataclasses.dataclass(frozen=True)
class LogitsArgs:
    """The logits pass's arguments of one call, checked and resolved."""
    labels: Tensor                 # flat int64, contiguous
    shape: torch.Size              # the labels' own shape (the per-token outputs')
    temperature: float
    ignore_index: int
    backend: str
    named: bool                    # the backend was named (a kernel that cannot run raises)
    validate_labels: bool
    shard: vocab_shard.VocabShard | None


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_label_range(labels: Tensor, vocab: int, ignore_index: int, name="labels"):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {first}")


def _check_labels(labels, tokens: Tensor, tokens_name: str) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64 or int32), got {labels.dtype}")
    if tuple(labels.shape) != tuple(tokens.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {tokens_name} shape "
                         f"{tuple(tokens.shape)} without its last dimension")
    if labels.device != tokens.device:
        raise ValueError(f"labels is on {labels.device} but {tokens_name} is on {tokens.device}")


def check_tokens(x, name: str, layouts: str) -> None:
    """The logits or the hidden states: a floating tensor, [N, .] or [B, T, .]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be {layouts}, got shape {tuple(x.shape)}")


def check_logits_labels(logits, labels) -> None:
    """Shapes, dtypes and devices of given logits and their labels."""
    check_tokens(logits, "logits", "[N, V] or [B, T, V]")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    _check_labels(labels, logits, "logits")


def resolve(tokens: Tensor, labels: Tensor, vocab: int, *, temperature, ignore_index, backend, validate_labels,
            vocab_process_group=None, vocab_start=None, name: str = "logits") -> LogitsArgs:
    """Every scalar argument of the logits pass checked, the backend chosen (named: it must run;
    automatic: a warned fallback), the labels range-checked (on CPU tensors by default, where it
    needs no device synchronisation; over a shard, against the whole vocabulary after the gather),
    and the shard found. `tokens` is the logits or the hidden states, `vocab` this rank's V."""
    temperature = check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if validate_labels is None:
        validate_labels = labels.device.type == "cpu" and not torch.compiler.is_compiling()
    sharded = vocab_process_group is not None or vocab_start is not None
    if sharded:
        vocab_shard.check_group_args(vocab_process_group, vocab_start)
    elif validate_labels:
        check_label_range(labels, vocab, ignore_index)
    named = _backend.requested_backend(backend) is not None
    backend = _backend.resolve_backend(backend, tokens.device, what=LOGITS_OPS)
    if tokens.dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"{name} of dtype float64 are supported by the torch and cpu backends, not {backend!r}")
    shard = (vocab_shard.resolve_shard(vocab_process_group, vocab_start, vocab, tokens.device) if sharded
             else None)
    return LogitsArgs(labels.reshape(-1).to(torch.int64).contiguous(), labels.shape, temperature, ignore_index,
                      backend, named, bool(validate_labels), shard)


# --------------------------------------------------------------------------------------------
# given logits


class GivenLogits:
    """The logits themselves: one tile, [B, T, V] with unit stride over V. With `inplace` the
    gradient is written into the logits' own storage (they are destroyed)."""

    traceable = True  # the plain route goes through the torch.library op (torch.compile)

    def __init__(self, logits: Tensor, inplace: bool = False):
        self.logits, self.rows, self.inplace = logits, as_rows(logits), inplace
        if inplace and self.rows.data_ptr() != logits.data_ptr():
            raise ValueError("inplace_grad=True needs logits with unit stride over the vocabulary")
        self.inputs = (logits,)
        self.dtype, self.device = logits.dtype, logits.device
        self._grad = None

    def tiles(self):
        yield 0, self.rows.shape[0] * self.rows.shape[1], self.rows.detach(), None

    def start_grads(self, want) -> None:
        self._grad = None

    def grad_buffer(self, tile: Tensor) -> Tensor:
        return tile if self.inplace else torch.empty_like(tile)

    def take_grad(self, s: int, e: int, g: Tensor, deriv) -> None:
        self._grad = g

    def grads(self) -> tuple:
        g = self._grad
        return (g.view(self.logits.shape) if self.inplace else g.reshape(self.logits.shape),)


# --------------------------------------------------------------------------------------------
# hidden states x lm_head weight


def _is_dtensor(x) -> bool:
    # a DTensor exists only once torch.distributed.tensor is imported: no import here
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def check_head(hidden, weight, labels, bias) -> None:
    check_tokens(hidden, "hidden", "[N, H] or [B, T, H]")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if _is_dtensor(x):
            raise TypeError(f"{name} is a DTensor (an FSDP2 shard?): pass the whole tensor, read inside the "
                            "forward of its FSDP unit, where FSDP2 unshards it and reduce-scatters its gradient "
                            "(a full_tensor() of your own bypasses that reduction); a vocabulary split over ranks "
                            "goes through vocab_process_group=")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        partitioned = (" (an empty weight: a DeepSpeed ZeRO-3 parameter outside its module's forward? Gather it "
                       "with deepspeed.zero.GatheredParameters, or make the call inside the model's forward)"
                       if weight.numel() == 0 else "")
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (the nn.Linear layout of lm_head), "
                         f"got shape {tuple(weight.shape)}{partitioned}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must be [V] = ({weight.shape[0]},) of the weight's dtype and device, "
                             f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    _check_labels(labels, hidden, "hidden")


def chunk_rows(chunk_size, vocab: int) -> int:
    if chunk_size is None:
        return max(MIN_ROWS, min(4096, TILE_BYTES // (4 * vocab) // 16 * 16))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def operand_dtype(hidden: Tensor) -> torch.dtype:
    """The lm_head GEMM's operand dtype: the hidden states', or autocast's where autocast is on for
    their device and would cast fp32 operands (TRL's GRPOConfig(bf16=True) runs the head so)."""
    device = hidden.device.type
    if hidden.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class LinearHead:
    """The logits z = softcap * tanh((h @ W.T + b) * logit_scale / softcap), `chunk` rows at a time:
    each tile is computed, used and dropped, and recomputed for the backward. Gradients: dhidden
    per chunk, dweight (fp32 accumulator unless fp64) and dbias summed over the chunks; over a
    vocabulary shard dhidden is summed over the ranks with one all_reduce, or left as this rank's
    partial sum (reduce_hidden_grad=False) for a caller whose own collective sums it (Megatron's
    tensor-parallel regions)."""

    traceable = False

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, *, softcap, logit_scale, chunk_size,
                 shard: vocab_shard.VocabShard | None, reduce_hidden_grad: bool = True):
        h = hidden.reshape(-1, hidden.shape[-1])
        self.hidden, self.h = hidden, (h if h.stride(-1) == 1 else h.contiguous())
        self.weight, self.bias = weight, bias
        self.softcap = check_float("softcap", softcap, lo=0.0, allow_none=True)
        self.logit_scale = check_float("logit_scale", logit_scale, allow_none=True)
        self.chunk = chunk_rows(chunk_size, weight.shape[0])
        self.shard, self.reduce_hidden_grad = shard, reduce_hidden_grad
        self.inputs = (hidden, weight, bias)
        self.dtype, self.device = hidden.dtype, hidden.device
        # Fixed here, in forward: the backward recomputes the tiles outside any autocast region and
        # must round the operands as the forward did, or its softmax would not match the saved lse.
        self.operands = operand_dtype(hidden)
        self._weight_operand = None
        self.dh = self.dw = self.db = None

    def tiles(self):
        n = self.h.shape[0]
        for s in range(0, n, self.chunk):
            e = min(s + self.chunk, n)
            tile, deriv = self._tile(self.h[s:e])
            yield s, e, tile, deriv

    def _tile(self, h: Tensor) -> tuple[Tensor, Tensor | float | None]:
        """The chunk's logits as [1, C, V] (unit stride over V) and dz_out/dz_raw (a tensor for
        softcap, else the scale, None for no transform). The tile is the GEMM's fp32 accumulator,
        never rounded to bf16/fp16: rounding |z| ~ 10 to bf16 moves a log-prob by ~0.02, where
        verl's, Liger's and CCE's kernels keep fp32 (fp64 inputs stay fp64)."""
        raw = self._accumulate(h)
        if self.bias is not None:
            raw += self.bias
        if self.softcap is None and self.logit_scale is None:
            return raw.unsqueeze(0), None
        scale = 1.0 if self.logit_scale is None else self.logit_scale
        if self.logit_scale is not None:
            raw.mul_(scale)
        if self.softcap is None:
            return raw.unsqueeze(0), scale
        t = torch.tanh(raw / self.softcap)
        deriv = (1.0 - t * t).mul_(scale)
        return (t.mul_(self.softcap)).unsqueeze(0), deriv

    def _accumulate(self, h: Tensor) -> Tensor:
        """h @ W.T with an fp32 (or fp64) result. CUDA's GEMM returns its fp32 accumulator for
        bf16/fp16 operands (`out_dtype`); the CPU GEMM only rounds its result to the operands' dtype,
        so there the operands are widened, the weight a block of vocabulary rows at a time (the
        products of bf16/fp16 values are exact in fp32: only the summation order differs)."""
        with torch.autocast(self.device.type, enabled=False):
            if self.operands in (torch.float32, torch.float64):
                return torch.mm(h, self.weight.t())
            h = h.to(self.operands)
            if h.device.type == "cuda":
                return torch.mm(h, self.weight_operand().t(), out_dtype=torch.float32)
            vocab = self.weight.shape[0]
            out = torch.empty(h.shape[0], vocab, dtype=torch.float32, device=h.device)
            h32 = h.float()
            step = max(1024, WIDEN_BYTES // (4 * self.weight.shape[1]))
            for v in range(0, vocab, step):
                torch.mm(h32, self.weight[v:v + step].to(self.operands).float().t(), out=out[:, v:v + step])
            return out

    def weight_operand(self) -> Tensor:
        """The weight in the operands' dtype: itself, or (under autocast) a copy kept for the call,
        as autocast's own cast cache keeps one."""
        if self.weight.dtype == self.operands:
            return self.weight
        if self._weight_operand is None:
            self._weight_operand = self.weight.detach().to(self.operands)
        return self._weight_operand

    def start_grads(self, want) -> None:
        """Accumulators for the inputs whose gradient is wanted (hidden, weight, bias): a frozen
        weight costs no dweight GEMM."""
        want_h, want_w, want_b = (bool(w) for w in want)
        acc = torch.float64 if self.h.dtype == torch.float64 else torch.float32
        self.dh = torch.empty_like(self.h) if want_h else None
        self.dw = torch.zeros(self.weight.shape, dtype=acc, device=self.device) if want_w else None
        self.db = torch.zeros(self.weight.shape[0], dtype=acc, device=self.device) if want_b and self.bias is not None \
            else None

    def grad_buffer(self, tile: Tensor) -> Tensor:
        return tile  # the tile is ours: dL/dz is written over it

    def take_grad(self, s: int, e: int, g_tile: Tensor, deriv) -> None:
        g = g_tile[0]
        if deriv is not None:
            g.mul_(deriv)  # the chain rule through the transform, in place
        if self.db is not None:
            self.db += g.sum(0, dtype=self.db.dtype)
        # dL/dz rounded to the operands' dtype, as autograd would hand it to the GEMMs
        g = g.to(self.operands)
        with torch.autocast(self.device.type, enabled=False):
            if self.dh is not None:
                w = self.weight_operand()
                if self.dh.dtype == g.dtype:
                    torch.mm(g, w, out=self.dh[s:e])
                else:  # autocast: fp32 hidden states, bf16/fp16 GEMM
                    self.dh[s:e] = torch.mm(g, w)
            h = None if self.dw is None else self.h[s:e].to(self.operands)
            if self.dw is None:
                pass
            elif g.dtype == self.dw.dtype:
                self.dw.addmm_(g.t(), h)
            elif g.device.type == "cuda":  # bf16/fp16 operands, the fp32 accumulator
                torch.addmm(self.dw, g.t(), h, out_dtype=torch.float32, out=self.dw)
            else:
                self.dw.addmm_(g.t().float(), h.float())

    def grads(self) -> tuple:
        if self.reduce_hidden_grad:
            vocab_shard.all_reduce_hidden_grad(self.dh, self.shard)
        dh = None if self.dh is None else self.dh.view(self.hidden.shape)
        dw = None if self.dw is None else self.dw.to(self.weight.dtype)
        db = None if self.db is None else self.db.to(self.weight.dtype)
        return dh, dw, db
