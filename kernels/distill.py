"""Triton kernels of the distillation losses (contract: alignops/distill.py).

One program per row pair (student row n, teacher row n), looping over the vocabulary in tiles of
BLOCK_V, the grid 1-D and capped as in token_stats.py. Forward reads the pair twice (both softmax
normalisers, then the divergence: JSD's log m needs both first); backward reads it once and writes
the student's gradient once. log p = (x - max) * inv_temp - log s, as in token_stats.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from alignops._backend import triton_interpreted as _interpreted

from .token_stats import (row_softmax_stats, _MAX_PROGRAMS, _check_inv_temperature, _check_logits, _check_rows,
                          _device_guard, _launch_config, _round_to_bf16)

FORWARD_KL, REVERSE_KL = 0, 1


@triton.jit
def _elements(ls, lt, DIV: tl.constexpr, BETA: tl.constexpr, LOG_BETA: tl.constexpr, LOG1M_BETA: tl.constexpr):
    """Per element: the divergence's term, p_s, p_t and h = dL/dp_s (0 where p_s = 0). A
    probability of 0 contributes exactly 0 (never 0 * inf)."""
    ps = tl.exp(ls)
    pt = tl.exp(lt)
    if DIV == 0:
        h = tl.zeros_like(ls)
        term = tl.where(pt > 0.0, pt * (lt - ls), 0.0)
    elif DIV == 1:
        h = tl.where(ps > 0.0, ls - lt, 0.0)
        term = ps * h
    else:
        m = BETA * pt + (1.0 - BETA) * ps
        # below the smallest normal (both probabilities ~0) the larger part's log keeps terms finite
        lm = tl.where(m >= 1.1754943508222875e-38, tl.log(m), tl.maximum(lt + LOG_BETA, ls + LOG1M_BETA))
        h = tl.where(ps > 0.0, (1.0 - BETA) * (ls - lm), 0.0)
        term = BETA * tl.where(pt > 0.0, pt * (lt - lm), 0.0) + ps * h
    return term, ps, pt, h


@triton.jit
def _tile_log_probs(s_row, t_row, cols, V, ms, log_ss, mt, log_st, INV_TEMP: tl.constexpr):
    """Both models' log-probs over one tile of the vocabulary (-inf past the row's end)."""
    in_row = cols < V
    xs = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32)
    xt = tl.load(t_row + cols, mask=in_row, other=0.0).to(tl.float32)
    ls = tl.where(in_row, (xs - ms) * INV_TEMP - log_ss, float("-inf"))
    lt = tl.where(in_row, (xt - mt) * INV_TEMP - log_st, float("-inf"))
    return ls, lt


@triton.jit
def _distill_fwd_kernel(
    student_ptr, teacher_ptr, valid_ptr, loss_ptr, stats_ptr,
    N, T, V, s_stride_b, s_stride_t, t_stride_b, t_stride_t,
    INV_TEMP: tl.constexpr, DIV: tl.constexpr, BETA: tl.constexpr, LOG_BETA: tl.constexpr,
    LOG1M_BETA: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols_in_tile = tl.arange(0, BLOCK_V)
    for row32 in range(pid, N, num_programs):
        row = tl.cast(row32, tl.int64)
        st = stats_ptr + row * 5
        if tl.load(valid_ptr + row).to(tl.int1):
            s_row = student_ptr + (row // T) * s_stride_b + (row % T) * s_stride_t
            t_row = teacher_ptr + (row // T) * t_stride_b + (row % T) * t_stride_t
            ms, ss, _ = row_softmax_stats(s_row, V, V, INV_TEMP, False, BLOCK_V)
            mt, s_t, _ = row_softmax_stats(t_row, V, V, INV_TEMP, False, BLOCK_V)
            log_ss = tl.log(ss)
            log_st = tl.log(s_t)
            loss = 0.0
            dot = 0.0
            for v0 in range(0, V, BLOCK_V):
                ls, lt = _tile_log_probs(s_row, t_row, v0 + cols_in_tile, V, ms, log_ss, mt, log_st, INV_TEMP)
                term, ps, pt, h = _elements(ls, lt, DIV, BETA, LOG_BETA, LOG1M_BETA)
                loss += tl.sum(term, 0)
                dot += tl.sum(ps * h, 0)
            tl.store(loss_ptr + row, loss)
            tl.store(st, ms)
            tl.store(st + 1, log_ss)
            tl.store(st + 2, mt)
            tl.store(st + 3, log_st)
            if DIV == 0:
                tl.store(st + 4, -1.0)
            else:
                tl.store(st + 4, dot)
        else:
            tl.store(loss_ptr + row, 0.0)
            for k in range(5):
                tl.store(st + k, 0.0)


@triton.jit
def _distill_bwd_kernel(
    student_ptr, teacher_ptr, valid_ptr, stats_ptr, grad_loss_ptr, grad_ptr,
    N, T, V, s_stride_b, s_stride_t, t_stride_b, t_stride_t, g_stride_b, g_stride_t,
    INV_TEMP: tl.constexpr, DIV: tl.constexpr, BETA: tl.constexpr, LOG_BETA: tl.constexpr,
    LOG1M_BETA: tl.constexpr, BLOCK_V: tl.constexpr, SOFTWARE_BF16_ROUNDING: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols_in_tile = tl.arange(0, BLOCK_V)
    out_dtype = grad_ptr.dtype.element_ty
    for row32 in range(pid, N, num_programs):
        row = tl.cast(row32, tl.int64)
        g_row = grad_ptr + (row // T) * g_stride_b + (row % T) * g_stride_t
        if tl.load(valid_ptr + row).to(tl.int1):
            s_row = student_ptr + (row // T) * s_stride_b + (row % T) * s_stride_t
            t_row = teacher_ptr + (row // T) * t_stride_b + (row % T) * t_stride_t
            st = stats_ptr + row * 5
            ms = tl.load(st)
            log_ss = tl.load(st + 1)
            mt = tl.load(st + 2)
            log_st = tl.load(st + 3)
            dot = tl.load(st + 4)
            c = tl.load(grad_loss_ptr + row) * INV_TEMP
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols_in_tile
                in_row = cols < V
                # each element is loaded before this program stores to it: grad may alias student
                ls, lt = _tile_log_probs(s_row, t_row, cols, V, ms, log_ss, mt, log_st, INV_TEMP)
                _, ps, pt, h = _elements(ls, lt, DIV, BETA, LOG_BETA, LOG1M_BETA)
                # p_s - p_t for forward KL (its dot is -1); p_s (h - dot), not q - p_s dot (which
                # cancels two products of the largest p_s)
                if DIV == 0:
                    g = (ps - pt) * c
                else:
                    g = ps * (h - dot) * c
                if SOFTWARE_BF16_ROUNDING:
                    tl.store(g_row + cols, _round_to_bf16(g), mask=in_row)
                else:
                    tl.store(g_row + cols, g.to(out_dtype), mask=in_row)
        else:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols_in_tile
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=out_dtype), mask=cols < V)


# --------------------------------------------------------------------------------------------
# launchers (signatures: the kernel contract in alignops/distill.py)


def _check_pair(student, teacher):
    _check_logits(student, "student")
    _check_logits(teacher, "teacher")
    if tuple(teacher.shape) != tuple(student.shape) or teacher.dtype != student.dtype:
        raise ValueError(f"teacher must have the student's shape {tuple(student.shape)} and dtype {student.dtype}, "
                         f"got {tuple(teacher.shape)} {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    B, T, V = student.shape
    if V == 0:
        raise ValueError("student has an empty vocabulary (V = 0)")
    return B * T, T, V


def _beta_args(divergence, beta) -> dict:
    divergence = int(divergence)
    if divergence not in (0, 1, 2):
        raise ValueError(f"divergence must be 0 (forward KL), 1 (reverse KL) or 2 (JSD), got {divergence}")
    beta = float(beta)
    if divergence == 2 and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1) for JSD, got {beta}")
    if divergence != 2:
        beta = 0.5  # unused: one compiled variant per KL, whatever beta the caller holds
    return dict(DIV=divergence, BETA=beta, LOG_BETA=math.log(beta), LOG1M_BETA=math.log1p(-beta))


def _check_call(student, teacher, valid, stats, inv_temperature, divergence, beta):
    """What both launchers check: (N, T, V, the checked 1/temperature, the kernels' divergence constants)."""
    N, T, V = _check_pair(student, teacher)
    _check_rows(valid, "valid", N, torch.bool, student.device)
    _check_rows(stats, "stats", 5 * N, torch.float32, student.device)
    return N, T, V, _check_inv_temperature(inv_temperature), _beta_args(divergence, beta)


def distill_fwd(student, teacher, valid, inv_temperature, divergence, beta, loss, stats) -> None:
    N, T, V, inv_temperature, consts = _check_call(student, teacher, valid, stats, inv_temperature, divergence, beta)
    device = student.device
    _check_rows(loss, "loss", N, torch.float32, device)
    if N == 0:
        return
    block_v, num_warps = _launch_config(V)
    with _device_guard(device):
        _distill_fwd_kernel[(min(N, _MAX_PROGRAMS),)](
            student, teacher, valid, loss, stats,
            N, T, V, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            INV_TEMP=inv_temperature, BLOCK_V=block_v, num_warps=num_warps, **consts,
        )


def distill_bwd(student, teacher, valid, stats, grad_loss, inv_temperature, divergence, beta, grad_student) -> None:
    N, T, V, inv_temperature, consts = _check_call(student, teacher, valid, stats, inv_temperature, divergence, beta)
    _check_logits(grad_student, "grad_student")
    device = student.device
    if tuple(grad_student.shape) != tuple(student.shape) or grad_student.dtype != student.dtype:
        raise ValueError(f"grad_student must have the student's shape {tuple(student.shape)} and dtype "
                         f"{student.dtype}, got {tuple(grad_student.shape)} {grad_student.dtype}")
    _check_rows(grad_loss, "grad_loss", N, torch.float32, device)
    if N == 0:
        return
    block_v, num_warps = _launch_config(V)
    with _device_guard(device):
        _distill_bwd_kernel[(min(N, _MAX_PROGRAMS),)](
            student, teacher, valid, stats, grad_loss, grad_student,
            N, T, V, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            grad_student.stride(0), grad_student.stride(1),
            INV_TEMP=inv_temperature, BLOCK_V=block_v,
            SOFTWARE_BF16_ROUNDING=_interpreted() and grad_student.dtype == torch.bfloat16,
            num_warps=num_warps, **consts,
        )
