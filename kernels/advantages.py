"""Triton kernels of the advantage estimators. The launchers follow the kernel contract in
alignops/advantages/__init__.py exactly (same arguments, caller-allocated outputs).

- group_advantages: one program per group. The group's rows are found through `order`/`offsets`
  (a segmented layout built with torch ops, so ragged group ids need no Python loop); the program
  reads its segment for the statistics (float64) and again, from cache, to write the advantages.
- masked_moments: per-program float64 (count, mean, M2), merged in a fixed order with torch
  (alignops.distributed.merge_moment_rows; no atomics, so the result is bitwise reproducible).
- whiten_apply: elementwise, float64 arithmetic (x - mean must not lose the digits of a mean ~1e3).
- gae_scan: one program per row, walking the row from its end in tiles. Inside a tile the
  backward recurrences are linear, y_t = a_t * y_next + b_t, so they are associative scans;
  a masked position is the identity element (a = 1, b = 0), which is exactly "transparent".

Float hyper-parameters reach the kernels as tl.constexpr (docs/design.md kernel rules).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from alignops._backend import triton_interpreted as _interpreted

from alignops.distributed import merge_moment_rows


# --------------------------------------------------------------------------------------------
# group statistics and advantages


@triton.jit
def _group_advantages_kernel(r_ptr, order_ptr, off_ptr, adv_ptr, cnt_ptr, mean_ptr, std_ptr,
                             MODE: tl.constexpr, STD_EPS: tl.constexpr, SINGLETON_RAW: tl.constexpr,
                             BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    start = tl.load(off_ptr + g)
    end = tl.load(off_ptr + g + 1)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    n_acc = tl.zeros([BLOCK], dtype=tl.float64)
    lo = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    hi = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    for j0 in range(start, end, BLOCK):
        j = j0 + lanes
        inb = j < end
        i = tl.load(order_ptr + j, mask=inb, other=0)
        x = tl.load(r_ptr + i, mask=inb, other=float("nan")).to(tl.float64)
        ok = inb & (x == x)
        acc += tl.where(ok, x, 0.0)
        n_acc += tl.where(ok, 1.0, 0.0)
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
    n = tl.sum(n_acc, axis=0)
    mu = tl.sum(acc, axis=0) / tl.maximum(n, 1.0)
    # Equal rewards have exactly zero spread, so their advantages are exactly 0.
    flat = (n <= 1.0) | (tl.min(lo, axis=0) == tl.max(hi, axis=0))
    m2_acc = tl.zeros([BLOCK], dtype=tl.float64)
    d_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j0 in range(start, end, BLOCK):
        j = j0 + lanes
        inb = j < end
        i = tl.load(order_ptr + j, mask=inb, other=0)
        x = tl.load(r_ptr + i, mask=inb, other=float("nan")).to(tl.float64)
        ok = inb & (x == x)
        d = tl.where(ok, x - mu, 0.0)
        m2_acc += d * d
        d_acc += d
    # corrected two-pass: the deviations' own mean, so that a group's centred rewards sum to 0
    dsum = tl.sum(d_acc, axis=0)
    corr = tl.where(flat, 0.0, dsum / tl.maximum(n, 1.0))
    m2 = tl.where(flat, 0.0, tl.maximum(tl.sum(m2_acc, axis=0) - dsum * corr, 0.0))
    sd = tl.where(flat, 0.0, tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0)))
    for j0 in range(start, end, BLOCK):
        j = j0 + lanes
        inb = j < end
        i = tl.load(order_ptr + j, mask=inb, other=0)
        x = tl.load(r_ptr + i, mask=inb, other=float("nan")).to(tl.float64)
        ok = x == x
        c = tl.where(flat, 0.0, (x - mu) - corr)
        if MODE == 1:
            a = c / (sd + STD_EPS)
        elif MODE == 2:
            a = c * n / tl.maximum(n - 1.0, 1.0)
        else:
            a = c
        if SINGLETON_RAW:
            a = tl.where(n == 1.0, x, a)
        else:
            a = tl.where(n == 1.0, 0.0, a)
        a = tl.where(ok, a, 0.0)
        tl.store(adv_ptr + i, a.to(adv_ptr.dtype.element_ty), mask=inb)
    tl.store(cnt_ptr + g, n.to(cnt_ptr.dtype.element_ty))
    tl.store(mean_ptr + g, (mu + corr).to(mean_ptr.dtype.element_ty))
    tl.store(std_ptr + g, sd.to(std_ptr.dtype.element_ty))


def group_advantages(rewards, order, offsets, mode, std_eps, singleton_raw, adv, count, mean, std):
    num_groups = offsets.numel() - 1
    if num_groups == 0:
        return
    block = 16 if _interpreted() else 128
    _group_advantages_kernel[(num_groups,)](
        rewards, order, offsets, adv, count, mean, std,
        MODE=int(mode), STD_EPS=float(std_eps), SINGLETON_RAW=bool(singleton_raw), BLOCK=block,
        num_warps=1 if _interpreted() else 4)


# --------------------------------------------------------------------------------------------
# masked moments and whitening


@triton.jit
def _masked_moments_kernel(x_ptr, m_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    keep = (tl.load(m_ptr + offs, mask=inb, other=0) != 0) & inb
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float64)
    x = tl.where(keep, x, 0.0)  # masked-out entries may hold NaN/inf
    k = tl.sum(tl.where(keep, 1.0, 0.0).to(tl.float64), axis=0)
    mu = tl.sum(x, axis=0) / tl.maximum(k, 1.0)
    d = tl.where(keep, x - mu, 0.0)
    tl.store(part_ptr + pid * 3, k)
    tl.store(part_ptr + pid * 3 + 1, mu)
    tl.store(part_ptr + pid * 3 + 2, tl.sum(d * d, axis=0))


def masked_moments(x, mask, out):
    n = x.numel()
    if n == 0:
        out.zero_()
        return
    block = 256 if _interpreted() else 4096
    programs = triton.cdiv(n, block)
    part = torch.empty(programs * 3, dtype=torch.float64, device=x.device)
    _masked_moments_kernel[(programs,)](x, mask.view(torch.uint8), part, n, BLOCK=block)
    out.copy_(merge_moment_rows(part.view(programs, 3)))


@triton.jit
def _whiten_apply_kernel(x_ptr, m_ptr, stats_ptr, out_ptr, n, SHIFT_BACK: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    keep = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    mu = tl.load(stats_ptr)
    inv = tl.load(stats_ptr + 1)
    x = tl.load(x_ptr + offs, mask=inb & keep, other=0.0).to(tl.float64)
    y = (x - mu) * inv
    if SHIFT_BACK:
        y = y + mu
    y = tl.where(keep, y, 0.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inb)


def whiten_apply(x, mask, stats, shift_back, out):
    n = x.numel()
    if n == 0:
        return
    block = 256 if _interpreted() else 2048
    _whiten_apply_kernel[(triton.cdiv(n, block),)](x, mask.view(torch.uint8), stats, out, n,
                                                   SHIFT_BACK=bool(shift_back), BLOCK=block)


# --------------------------------------------------------------------------------------------
# GAE scan


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # y -> a2 * (a1 * y + b1) + b2: the first map is applied first (it is later in time).
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _last(x, lanes, BLOCK: tl.constexpr):
    return tl.sum(tl.where(lanes == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _gae_scan_kernel(r_ptr, v_ptr, m_ptr, cu_ptr, lam_a_ptr, lam_c_ptr, adv_ptr, ret_ptr,
                     GAMMA: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + row)
    end = tl.load(cu_ptr + row + 1)
    acc_dtype = tl.float64 if F64 else tl.float32
    gl_a = (GAMMA * tl.load(lam_a_ptr + row)).to(acc_dtype)
    gl_c = (GAMMA * tl.load(lam_c_ptr + row)).to(acc_dtype)
    lanes = tl.arange(0, BLOCK)
    one = tl.full([BLOCK], 1.0, dtype=acc_dtype)
    zero = tl.zeros([BLOCK], dtype=acc_dtype)
    # Carries from the part of the row already scanned (later in time).
    next_value = tl.sum(zero, axis=0)
    run_a = tl.sum(zero, axis=0)
    run_c = tl.sum(zero, axis=0)
    for k0 in range(0, end - start, BLOCK):
        # Lane j holds time position end-1-(k0+j): scanning lanes upwards walks time backwards.
        pos = end - 1 - k0 - lanes
        inb = pos >= start
        m = (tl.load(m_ptr + pos, mask=inb, other=0) != 0) & inb
        r = tl.load(r_ptr + pos, mask=m, other=0.0).to(acc_dtype)
        v = tl.load(v_ptr + pos, mask=m, other=0.0).to(acc_dtype)
        # V at the next valid position strictly later in time: the running "last valid value"
        # scan, shifted by one lane (lane j reads lane j-1's position; lane 0 starts from the carry).
        pos_prev = pos + 1
        inb_prev = (lanes > 0) & (pos_prev >= start)
        m_prev = (tl.load(m_ptr + pos_prev, mask=inb_prev, other=0) != 0) & inb_prev
        v_prev = tl.load(v_ptr + pos_prev, mask=m_prev, other=0.0).to(acc_dtype)
        a_nv, b_nv = tl.associative_scan((tl.where(m_prev, zero, one), tl.where(m_prev, v_prev, zero)),
                                         0, _linear_combine)
        v_next = a_nv * next_value + b_nv
        delta = tl.where(m, r + GAMMA * v_next - v, zero)
        a_a, b_a = tl.associative_scan((tl.where(m, gl_a + zero, one), delta), 0, _linear_combine)
        a_c, b_c = tl.associative_scan((tl.where(m, gl_c + zero, one), delta), 0, _linear_combine)
        adv = a_a * run_a + b_a
        crit = a_c * run_c + b_c
        tl.store(adv_ptr + pos, tl.where(m, adv, zero).to(adv_ptr.dtype.element_ty), mask=inb)
        tl.store(ret_ptr + pos, tl.where(m, crit + v, zero).to(ret_ptr.dtype.element_ty), mask=inb)
        m_last = _last(tl.where(m, one, zero), lanes, BLOCK)
        next_value = m_last * _last(v, lanes, BLOCK) + (1.0 - m_last) * _last(v_next, lanes, BLOCK)
        run_a = _last(adv, lanes, BLOCK)
        run_c = _last(crit, lanes, BLOCK)


def gae_scan(rewards, values, mask, cu_seqlens, gamma, lam_actor, lam_critic, adv, ret):
    rows = cu_seqlens.numel() - 1
    if rows <= 0 or rewards.numel() == 0:
        adv.zero_()
        ret.zero_()
        return
    mean_len = max(1, rewards.numel() // rows)
    cap = 64 if _interpreted() else 1024
    block = max(16, min(cap, triton.next_power_of_2(mean_len)))
    _gae_scan_kernel[(rows,)](rewards, values, mask.view(torch.uint8), cu_seqlens, lam_actor, lam_critic,
                              adv, ret, GAMMA=float(gamma), F64=rewards.dtype == torch.float64,
                              BLOCK=block, num_warps=1 if _interpreted() else 4)
