"""Distillation losses: a divergence between the student's and the teacher's next-token
distributions over the whole vocabulary, per token (docs/methods.md §2.46, docs/distillation.md).

    distill_loss(student_logits, teacher_logits, labels=None, divergence="reverse_kl")
    fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, ...)

With p_s = softmax(student / T), p_t = softmax(teacher / T):

    forward_kl   KL(p_t || p_s)                                      (TRL GKD beta = 0, SFT-like)
    reverse_kl   KL(p_s || p_t)                                      (on-policy distillation)
    jsd          beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
                 (TRL's generalized_jsd_loss and Liger's JSD: beta = 0 and 1 are the two KLs)

The gradient flows to the student only. Every divergence's gradient w.r.t. the student's logits is
    dL/dz_v = (q_v - p_s,v * sum_u q_u) / T,   q = p_s * dL/dp_s
(q = -p_t for forward KL, p_s (log p_s - log p_t) for reverse KL, (1 - beta) p_s (log p_s - log m)
for JSD), so one backward kernel serves all three.

Kernel contract (backends torch, cpu, triton; registered in alignops._backend):

    distill_fwd(student, teacher, valid, inv_temperature, divergence, beta, loss, stats)
    distill_bwd(student, teacher, valid, stats, grad_loss, inv_temperature, divergence, beta,
                grad_student)

    student, teacher   [B, T, V], the same dtype (fp32/fp16/bf16; torch and cpu: also fp64), unit
                       stride over V
    valid              [B*T] bool, contiguous: a row that is not valid is not read; its loss,
                       stats and gradient are 0
    divergence         0 forward KL, 1 reverse KL, 2 JSD (0 < beta < 1)
    loss               [B*T] fp32 (fp64 for fp64 inputs)
    stats              [B*T, 5]: the student's raw row max and log sum exp((x - max) / T), the
                       teacher's, and sum_v q_v; log p = (x - max) / T - log s, so a log-prob near 0
                       keeps its precision for logits near +-1000
    grad_loss          [B*T] dL/dloss_row; grad_student [B, T, V] in the student's dtype (may alias
                       the student's logits)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch
from torch import Tensor

from alignops import _backend
from alignops._validate import check_choice, check_float
from alignops.layout import check_mask, compute_dtype
from alignops.logits import passes
from alignops.logits.kernels import as_rows
from alignops.logits.sources import LinearHead, check_head, check_temperature, check_tokens, chunk_rows

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
AGGS = ("token-mean", "sum")
DISTILL_OPS = "the distillation ops"
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


@dataclasses.dataclass
class DistillOutput:
    """`loss`: scalar with autograd (the student's). `losses`: the per-token divergence, detached,
    shaped like the tokens (0 where not counted). `metrics`: detached fp32 scalars, no host sync."""
    loss: Tensor
    losses: Tensor
    metrics: dict


# --------------------------------------------------------------------------------------------
# arguments


def _divergence_code(divergence, beta) -> tuple[int, float]:
    check_choice("divergence", divergence, DIVERGENCES)
    beta = check_float("beta", beta, lo=0.0, lo_open=False, hi=1.0)
    if divergence == "forward_kl":
        return FORWARD_KL, beta
    if divergence == "reverse_kl":
        return REVERSE_KL, beta
    # TRL and Liger define beta = 0 and 1 as the two KLs (the mixture's limit would be 0)
    return (FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD), beta


def _check_pair(student, teacher, s_name: str, t_name: str) -> None:
    for x, name in ((student, s_name), (teacher, t_name)):
        check_tokens(x, name, "[N, V] or [B, T, V]")
    if teacher.device != student.device:
        raise ValueError(f"{t_name} is on {teacher.device} but {s_name} is on {student.device}")


def _valid_rows(shape, device, labels, mask, ignore_index) -> Tensor:
    """Flat bool [N]: the tokens that count (label != ignore_index, and the mask)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (int64 or int32), got {labels.dtype}")
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match the token shape {tuple(shape)}")
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but the tokens are on {device}")
        valid = labels != ignore_index
    mask = check_mask(mask, shape, device)
    if mask is not None:
        valid = valid & mask
    return valid.reshape(-1).contiguous()


def _row_weights(valid: Tensor, agg, dtype) -> Tensor:
    """dloss/dloss_row of the aggregation: 1 / (number of counted tokens) for token-mean (an empty
    batch gives loss 0 and gradient 0), 1 for sum."""
    check_choice("agg", agg, AGGS)
    w = valid.to(dtype)
    if agg == "token-mean":
        w = w / valid.sum().clamp_min(1).to(dtype)
    return w


def _metrics(losses: Tensor, valid: Tensor) -> dict:
    n = valid.sum().clamp_min(1)
    return {"distill/divergence": (losses.sum() / n).detach().float()}


# --------------------------------------------------------------------------------------------
# the kernels


def rows_forward(student3: Tensor, teacher3: Tensor, valid: Tensor, temperature: float, code: int, beta: float,
                 backend: str) -> tuple[Tensor, Tensor]:
    """(loss [N], stats [N, 5]) of every row of two [B, T, V] tensors."""
    n = valid.numel()
    loss = torch.empty(n, dtype=compute_dtype(student3.dtype), device=student3.device)
    stats = torch.empty(n, 5, dtype=loss.dtype, device=loss.device)
    if n:
        _backend.kernel("distill_fwd", backend)(student3, teacher3, valid, 1.0 / temperature, code, beta, loss, stats)
    return loss, stats


def rows_backward(student3: Tensor, teacher3: Tensor, valid: Tensor, stats: Tensor, grad_loss: Tensor,
                  temperature: float, code: int, beta: float, backend: str, out: Tensor) -> Tensor:
    if valid.numel():
        _backend.kernel("distill_bwd", backend)(student3, teacher3, valid, stats, grad_loss.contiguous(),
                                                1.0 / temperature, code, beta, out)
    return out


class _DistillRows(torch.autograd.Function):
    """Per-token divergence of given logits; backward reads both rows once more and writes the
    student's gradient once."""

    @staticmethod
    def forward(ctx, student, teacher, valid, temperature, code, beta, backend):
        s3, t3 = as_rows(student.detach()), as_rows(teacher.detach())
        loss, stats = rows_forward(s3, t3, valid, temperature, code, beta, backend)
        ctx.save_for_backward(s3, t3, valid, stats)
        ctx.args = (temperature, code, beta, backend, student.shape)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        s3, t3, valid, stats = ctx.saved_tensors
        temperature, code, beta, backend, shape = ctx.args
        g = torch.empty_like(s3)
        rows_backward(s3, t3, valid, stats, grad_loss.to(stats.dtype), temperature, code, beta, backend, g)
        return g.view(shape), None, None, None, None, None, None


def _resolve_backend(backend, device, dtype, name):
    backend = _backend.resolve_backend(backend, device, supported=("torch", "cpu", "triton"), what=DISTILL_OPS)
    if dtype == torch.float64 and backend == "triton":
        raise TypeError(f"{name} of dtype float64 are supported by the torch and cpu backends, not 'triton'")
    return backend


# --------------------------------------------------------------------------------------------
# public ops


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                 divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, mask: Optional[Tensor] = None, agg: str = "token-mean",
                 backend: Optional[str] = None) -> DistillOutput:
    """The student's divergence from the teacher at every token, aggregated.

    Args:
        student_logits, teacher_logits: [N, V] or [B, T, V], the same shape and dtype. The teacher's
            gets no gradient.
        labels: optional token ids shaped like the tokens; positions equal to `ignore_index` do not
            count (TRL's GKD and Liger's JSD take their `labels` so). Only compared with ignore_index.
        divergence: "forward_kl" KL(p_t || p_s), "reverse_kl" KL(p_s || p_t), "jsd" (generalized,
            with `beta`; beta = 0 / 1 are forward / reverse KL, as in TRL and Liger).
        temperature: both distributions are softmax(logits / temperature).
        mask: optional bool (or 0/1) tensor shaped like the tokens; False positions do not count.
        agg: "token-mean" (the mean over counted tokens: TRL GKD's batchmean with labels, Liger's)
            or "sum".
    """
    _check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if teacher_logits.shape != student_logits.shape or teacher_logits.dtype != student_logits.dtype:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} {teacher_logits.dtype} must have the shape "
                         f"and dtype of student_logits {tuple(student_logits.shape)} {student_logits.dtype}")
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (V = 0)")
    code, beta = _divergence_code(divergence, beta)
    temperature = check_temperature(temperature)
    shape = student_logits.shape[:-1]
    valid = _valid_rows(shape, student_logits.device, labels, mask, ignore_index)
    w = _row_weights(valid, agg, compute_dtype(student_logits.dtype))
    backend = _resolve_backend(backend, student_logits.device, student_logits.dtype, "logits")
    losses, _ = _DistillRows.apply(student_logits, teacher_logits, valid, temperature, code, beta, backend)
    loss = (losses * w).sum()
    return DistillOutput(loss, losses.detach().view(shape), _metrics(losses.detach(), valid))


def _fused_rows(student: LinearHead, teacher: LinearHead, valid: Tensor, w: Tensor, temperature: float, code: int,
                beta: float, backend: str) -> tuple[Tensor, tuple]:
    """(per-token losses, the student's input gradients for the loss sum(w * losses)): each chunk's two
    logits tiles are computed, used and dropped; the loss is terminal, so its gradients are taken now
    (the student's tile becomes its own gradient) and backward only scales them."""
    want = [x is not None and x.requires_grad for x in student.inputs]
    student.start_grads(want)
    losses = torch.empty(valid.numel(), dtype=torch.float64 if student.dtype == torch.float64 else torch.float32,
                         device=valid.device)
    for (s, e, ts, deriv), (_, _, tt, _) in zip(student.tiles(), teacher.tiles()):
        tt = tt.to(ts.dtype)
        losses[s:e], stats = rows_forward(ts, tt, valid[s:e], temperature, code, beta, backend)
        if any(want):
            g = rows_backward(ts, tt, valid[s:e], stats, w[s:e].to(stats.dtype), temperature, code, beta, backend, ts)
            student.take_grad(s, e, g, deriv)
    return losses, student.grads() if any(want) else (None,) * len(student.inputs)


def fused_linear_distill_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                              teacher_weight: Tensor, labels: Optional[Tensor] = None, *,
                              student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                              softcap: Optional[float] = None, logit_scale: Optional[float] = None,
                              teacher_softcap: Optional[float] = None, teacher_logit_scale: Optional[float] = None,
                              divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                              ignore_index: int = -100, mask: Optional[Tensor] = None, agg: str = "token-mean",
                              chunk_size: Optional[int] = None, backend: Optional[str] = None) -> DistillOutput:
    """distill_loss of `student_hidden @ student_weight.T (+ student_bias)` and the teacher's, without
    either [N, V] logits: `chunk_size` rows at a time (default: the fused lm_head's), each tile the
    GEMM's fp32 accumulator. Hidden states [N, H] or [B, T, H] (the teacher's H may differ);
    weights [V, H] (nn.Linear's layout), the same V. `softcap` / `logit_scale` transform the student's
    logits as the fused lm_head does (softcap * tanh(z * logit_scale / softcap): Gemma, Cohere,
    Granite heads), `teacher_softcap` / `teacher_logit_scale` the teacher's. Gradients reach the
    student's hidden states, weight and bias."""
    for hidden, weight, bias, who in ((student_hidden, student_weight, student_bias, "student"),
                                      (teacher_hidden, teacher_weight, teacher_bias, "teacher")):
        tokens = torch.zeros(hidden.shape[:-1] if isinstance(hidden, Tensor) else (), dtype=torch.int64,
                             device=hidden.device if isinstance(hidden, Tensor) else None)
        try:
            check_head(hidden, weight, tokens, bias)
        except (TypeError, ValueError) as e:  # the fused lm_head's checks, with this model's argument names
            raise type(e)(re.sub(r"(?<![\w.])(hidden|weight|bias)(?!\w)", rf"{who}_\1", str(e))) from None
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must have the token shape of student_hidden "
                         f"{tuple(student_hidden.shape)}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight has V = {teacher_weight.shape[0]} but student_weight has "
                         f"V = {student_weight.shape[0]}: the two vocabularies must be the same")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on "
                         f"{student_hidden.device}")
    code, beta = _divergence_code(divergence, beta)
    temperature = check_temperature(temperature)
    shape = student_hidden.shape[:-1]
    valid = _valid_rows(shape, student_hidden.device, labels, mask, ignore_index)
    fp64 = student_hidden.dtype == torch.float64
    w = _row_weights(valid, agg, torch.float64 if fp64 else torch.float32)
    backend = _resolve_backend(backend, student_hidden.device, student_hidden.dtype, "hidden")
    chunk = chunk_rows(chunk_size, student_weight.shape[0])
    student = LinearHead(student_hidden, student_weight, student_bias, softcap=softcap, logit_scale=logit_scale,
                         chunk_size=chunk, shard=None)
    try:
        teacher = LinearHead(teacher_hidden.detach(), teacher_weight.detach(),
                             None if teacher_bias is None else teacher_bias.detach(), softcap=teacher_softcap,
                             logit_scale=teacher_logit_scale, chunk_size=chunk, shard=None)
    except (TypeError, ValueError) as e:
        raise type(e)(re.sub(r"(?<![\w.])(softcap|logit_scale)(?!\w)", r"teacher_\1", str(e))) from None
    if torch.compiler.is_compiling():
        raise RuntimeError("fused_linear_distill_loss is eager-only")
    with torch.no_grad():
        losses, grads = _fused_rows(student, teacher, valid, w, temperature, code, beta, backend)
    loss = passes.precomputed((losses * w.to(losses.dtype)).sum(), student, grads)
    return DistillOutput(loss, losses.detach().view(shape), _metrics(losses.detach(), valid))


__all__ = ["distill_loss", "fused_linear_distill_loss", "DistillOutput", "DIVERGENCES"]
