"""alignops inside TRL 1.16: its fused lm_head on alignops's kernels, and GRPO's whole policy loss in one call.

    from alignops.integrations.trl import use_alignops
    use_alignops()                  # every TRL trainer's fused lm_head now runs ao.fused_linear_token_logprobs
    with use_alignops(backend="triton"):
        trainer.train()             # TRL's own function is back when the block ends (or after .restore())

TRL's trainers score tokens through `model(..., labels=labels, fused_lm_head=True)` (added by
`trl.trainer.utils.add_fused_lm_head`), which looks `trl.trainer.utils._ChunkedLogProbFunction` up
at call time; use_alignops replaces that name with a function of the same signature and outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

import alignops as ao
from alignops._validate import check_float

TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


# --------------------------------------------------------------------------------------------
# the chunked lm_head function


def _check_outputs(outputs) -> tuple[str, ...]:
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple of names from {TRL_OUTPUTS}, got {outputs!r}")
    unknown = [o for o in outputs if o not in TRL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs has unknown names {unknown}; known: {TRL_OUTPUTS}")
    return tuple(outputs)


def _zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: PLC0415
    return bool(is_deepspeed_zero3_enabled())


def _head_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype TRL projects in: the autocast dtype when autocast is on, else the hidden states' own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


@torch.no_grad()
def _distribution_stats(hidden, weight, bias, targets, temperature, softcap, logit_scale, want, rows):
    """The no-gradient outputs TRL offers besides log-probs and entropy, one logits tile of `rows` tokens at a time:
    log(sum_v p_v^2), the mean transformed logit, and whether the target is the first argmax."""
    n, vocab = hidden.shape[0], weight.shape[0]
    out = {}
    if "log_sum_sq_probs" in want:
        out["log_sum_sq_probs"] = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if "mean_logits" in want:
        out["mean_logits"] = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if "is_top1" in want:
        out["is_top1"] = torch.empty(n, dtype=torch.bool, device=hidden.device)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = hidden[s:e] @ weight.t()
        if bias is not None:
            z = z + bias
        z = z.float()
        if logit_scale is not None:
            z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        if "log_sum_sq_probs" in out:
            out["log_sum_sq_probs"][s:e] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
        if "mean_logits" in out:
            out["mean_logits"][s:e] = z.sum(-1) / vocab
        if "is_top1" in out:
            out["is_top1"][s:e] = z.argmax(-1) == targets[s:e]
    return out


class AlignopsChunkedLogProb:
    """A stand-in for `trl.kernels.ChunkedLogProbFunction`: `apply(hidden [N, H], weight [V, H], bias, targets [N],
    temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)` returns TRL's 5-tuple
    `(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`, None where not asked for.

    log_probs and entropy come from ao.fused_linear_token_logprobs, with their gradients; the other three (no
    gradient, as in TRL) from one extra logits pass, only when asked for (SFT, DPO and KTO ask; GRPO does not).
    TRL's `chunk_size` is the width of its vocabulary tiles: alignops never splits the vocabulary, so it is
    checked and not used; alignops's own row chunk is `chunk_rows` (None: its default)."""

    def __init__(self, backend: str | None = None, chunk_rows: int | None = None):
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_rows!r}")
        if backend is not None:
            if backend not in ao.BACKENDS:
                raise ValueError(f"backend must be one of {ao.BACKENDS} or None, got {backend!r}")
        self.backend = backend
        self.chunk_rows = chunk_rows

    def apply(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
              chunk_size: int, final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
              outputs: tuple[str, ...] = TRL_OUTPUTS):
        outputs = _check_outputs(outputs)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(hidden, Tensor) or hidden.dim() != 2:
            raise ValueError(f"hidden must be a [N, H] tensor, got {getattr(hidden, 'shape', type(hidden).__name__)}")
        if _zero3_enabled():
            # TRL's backward gathers the ZeRO-3 partitioned head again; alignops's autograd keeps the weight it was
            # given, which ZeRO-3 empties after forward.
            raise NotImplementedError("use_alignops does not support DeepSpeed ZeRO-3 (the lm_head weight is "
                                      "re-partitioned before backward); use ZeRO-1/2 or FSDP, or AlignopsGRPOTrainer, "
                                      "whose terminal loss takes its gradients inside the gathered forward")
        softcap = check_float("final_logit_softcapping", final_logit_softcapping, lo=0.0, allow_none=True)
        logit_scale = check_float("logit_scale", logit_scale)
        scale = None if logit_scale == 1.0 else logit_scale
        dtype = _head_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        want_entropy = "entropy" in outputs
        with torch.autocast(hidden.device.type, enabled=False):
            res = ao.fused_linear_token_logprobs(h, w, targets, b, temperature=temperature,
                                                 return_entropy=want_entropy, softcap=softcap, logit_scale=scale,
                                                 backend=self.backend, chunk_size=self.chunk_rows)
            logp, entropy = res if want_entropy else (res, None)
            extra = {}
            if any(o in outputs for o in TRL_OUTPUTS[2:]):
                rows = self.chunk_rows or max(1, min(4096, (64 << 20) // (4 * max(1, w.shape[0]))))
                extra = _distribution_stats(h.detach(), w.detach(), None if b is None else b.detach(), targets,
                                            float(temperature), softcap, scale, outputs, rows)
        return (logp, entropy, extra.get("log_sum_sq_probs"), extra.get("mean_logits"), extra.get("is_top1"))


def _trl_utils():
    import trl.trainer.utils as trl_utils  # noqa: PLC0415 - TRL is imported only by this integration
    return trl_utils


class AlignopsPatch:
    """What use_alignops returns: `restore()` (or leaving its `with` block) puts back the function it replaced."""

    def __init__(self, function: AlignopsChunkedLogProb):
        self.function = function
        self._replaced = None
        self._active = False

    def install(self) -> "AlignopsPatch":
        utils = _trl_utils()
        self._replaced = utils._ChunkedLogProbFunction
        utils._ChunkedLogProbFunction = self.function
        self._active = True
        return self

    @property
    def active(self) -> bool:
        return self._active

    def restore(self) -> None:
        if not self._active:
            return
        utils = _trl_utils()
        if utils._ChunkedLogProbFunction is not self.function:
            raise RuntimeError("use_alignops patches restored out of order: restore the most recent one first")
        utils._ChunkedLogProbFunction = self._replaced
        self._active = False

    def __enter__(self) -> "AlignopsPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def use_alignops(backend: str | None = None, chunk_size: int | None = None) -> AlignopsPatch:
    """Runs TRL's fused lm_head (`trl.trainer.utils._ChunkedLogProbFunction`) on ao.fused_linear_token_logprobs.

    Args:
        backend: alignops backend for the logits pass (None: automatic).
        chunk_size: token rows per logits tile (None: alignops's default, a 64 MiB fp32 tile of at least 512 rows).

    Returns:
        An AlignopsPatch: the patch is on at once; `restore()` or the end of a `with` block undoes it.
    """
    return AlignopsPatch(AlignopsChunkedLogProb(backend, chunk_size)).install()


def trl_chunked_function():
    """The function TRL's fused lm_head calls now (TRL's own, or an alignops stand-in)."""
    return _trl_utils()._ChunkedLogProbFunction


__all__ = ["use_alignops", "AlignopsPatch", "AlignopsChunkedLogProb", "trl_chunked_function"]
