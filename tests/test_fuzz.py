"""One hypothesis harness over the whole public logits surface, on every backend that runs here,
against float64 math on the same rounded inputs and against each other: values, metrics and the
gradients with respect to the logits (or the hidden states, the lm_head weight and its bias).

What one example draws (a `Case`, from `cases()`):
  op        token_logprobs (with or without the entropy), fused_policy_loss (a method of the
            registry with its own options and the shared knobs drawn for it: clips, dual clip,
            aggregation, normaliser, KL estimator, entropy bonus, log-ratio clamp, importance
            weights, on- or off-policy, per-row or per-token advantages; the autograd,
            grad_in_forward and inplace_grad routes), sequence_logprobs, sft_loss (every weighting,
            sequence weights, cutoff, normaliser), and the fused lm_head form of each
            (fused_linear_*: bias, softcap, logit_scale, chunk size, a frozen or transposed weight)
  layout    padded [B, T, V]; flat [N, V]; packed [N, V] with cu_seqlens (empty rows included);
            the shift logits[:, :-1] / labels[:, 1:]; strided rows; a vocabulary dimension without
            unit stride; hidden states as a transposed [T, B, H] buffer; strided labels
  dtype     fp32, bf16, fp16, fp64 (fp64 on torch and cpu only)
  logits    normal, peaked (+50), shifted by +-1000, -inf entries; V = 1, small primes and, now and
            then, 129920 or 151936 (only with at most two tokens, and never on interpreted triton)
  labels    ignore_index nowhere, here and there, first or last of every row, a whole row, all
            tokens; NaN in the logits rows of ignored tokens and in every per-token input the loss
            must not read (the "garbage" flag); mask None, random, ones, zeros, an empty row, 0/1
            floats; N = 0, B = 0, all-masked batches, a zero normaliser; any temperature > 0
Backends: torch, cpu and triton (on CPU tensors triton runs in the interpreter, so only at small
sizes), each on its device (tests.conftest.device_of).

The oracle is float64 torch math written here from docs/methods.md and docs/api.md, never the code
under test: log_softmax of the same rounded logits (or of h @ W.T + b from the same rounded hidden
states and weight), then each objective as a function of the per-token log-probs and entropies,
built from tests/policy_oracle.py's per-token surrogates, aggregation and KL estimators (the
sequence-ratio methods, GPG's alpha and the SFT weightings are written below; BAPO's bound search
is tests/test_policy_loss.py's literal loop). Gradients are autograd's, through the float64 math.
Ratios are kept 1e-3 (relative) away from every clip bound, since a kernel's last-bit difference
may legitimately put a ratio on the other side of a bound (ties are measure-zero).

Tolerances (docs/testing.md): an output may differ from the oracle by 1e-5 of its scale (1e-10
for fp64), where the scale is the size of the terms that cancel in it, plus what twice eager
torch's own error in the logits pass moves it by: eager torch is log_softmax(logits / T) in the
logits' dtype (fp32 for the values of bf16/fp16 logits, whose accumulation is fp32 by the API's
contract; in the hidden states' dtype for the fused lm_head, GEMM included), and its per-token
error in logp and entropy, propagated to first order through the objective, bounds the kernel's
share (an fp32 value's logp error counts as at least 4 ulps). Gradients: 1e-5 of the largest entry
or of what the per-token coefficients can make of one (the size of the terms that cancel), plus
twice eager's gradient error, plus what the error in logp moves the per-token coefficients by (a
KL term's or a ratio's curvature); a bf16/fp16 gradient may also carry its one rounding to the
dtype, and the fused lm_head's the rounding of dL/dz to the dtype that the GEMMs carry, as
autograd's would, and the GEMMs' own fp32 accumulation (gamma_n of the absolute terms). The fused lm_head's log-probs in bf16/fp16 also meet verl's tolerance
1e-3 + 2e-4 |logp| (its logits tile is the GEMM's fp32 accumulator). Metrics (fp32 scalars) are
held to the oracle where it has them and to the torch backend otherwise. Degenerate input:
ignored and masked positions give exactly 0 and get exactly 0 gradient, an empty row's sequence
log-prob is exactly 0, an all-masked batch or a zero normaliser gives a loss of exactly 0 with
zero gradients, N = 0 gives empty outputs and empty gradients.

`make test` runs BOUNDED_EXAMPLES examples, the same ones every run (about 35 s here); `make fuzz` runs FUZZ_EXAMPLES
(ALIGNOPS_FUZZ_EXAMPLES) of them with hypothesis's database, which replays a failure first the
next time. Every failure the fuzzer ever found is kept as an @example on the test, with what it
found.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import alignops as ao
from alignops.layout import AGG_MODES
from alignops.policy import KL_ESTIMATORS, METHODS, method_names
from alignops.sft import SFT_WEIGHTINGS
from tests import policy_oracle as po
from tests.conftest import device_of, fast_backends, make_logits
from tests.test_policy_loss import bapo_search_loop

BOUNDED_EXAMPLES = 200
EXAMPLES = int(os.environ.get("ALIGNOPS_FUZZ_EXAMPLES") or BOUNDED_EXAMPLES)
BACKENDS = ["torch"] + fast_backends()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
SMALL_V = (1, 2, 3, 5, 7, 11, 13, 31, 97, 127, 257, 263, 1031)
BIG_V = (129920, 151936)
# interpreted triton (no GPU) is slow: it gets the cases with at most this many logits
INTERPRETED_TRITON_MAX = 4096
GAP = 1e-3   # how close (relative) a ratio may come to a clip bound

OPS = ("token", "policy", "sequence", "sft", "linear_token", "linear_policy", "linear_sequence", "linear_sft")
LAYOUTS = {
    "token": ("padded", "flat", "shifted", "rows_strided", "vocab_strided"),
    "linear_token": ("padded", "flat", "shifted", "transposed"),
    "logits_rows": ("padded", "packed", "shifted", "vocab_strided"),
    "linear_rows": ("padded", "packed", "shifted", "transposed"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn call (see the module docstring); every tensor is made from `seed`. `options`: the
    op's keyword options as sorted (name, value) pairs, where rollout_is_weights and seq_weights are
    True when the call gets them, group_ids and rewards are tuples (passed as tensors), and a
    kl_coef brings a ref_logp."""
    op: str = "token"
    layout: str = "padded"
    dtype: str = "float32"
    B: int = 2
    T: int = 3
    lengths: tuple = ()            # packed layout: the rows' lengths
    V: int = 7
    H: int = 4
    temperature: float = 1.0
    pattern: str = "normal"
    ignore: str = "none"           # none | some | first | last | row | all
    ignore_index: int = -100
    mask: str = "none"             # none | random | ones | zeros | empty_row | float
    labels_strided: bool = False
    garbage: bool = False
    entropy: bool = False          # token ops: compute_entropy
    method: str = "grpo"
    options: tuple = ()
    on_policy: bool = False
    spread: float = 0.7            # |log ratio| drawn up to this
    token_adv: bool = False
    route: str = "autograd"        # autograd | grad_in_forward | inplace_grad
    bias: bool = False
    softcap: float | None = None
    logit_scale: float | None = None
    chunk_size: int | None = None
    weight_transposed: bool = False
    frozen_weight: bool = False
    seed: int = 0


# --------------------------------------------------------------------------------------------
# the strategy


def _policy_options(draw, method, rows):
    """The keyword options of a policy loss: the shared knobs, and the method's own."""
    m = METHODS[method]
    o = {}
    if draw(st.booleans()):
        o["clip_low"] = draw(st.sampled_from([0.1, 0.2, 0.3]))
    if draw(st.booleans()):
        o["clip_high"] = draw(st.sampled_from([0.2, 0.28, 0.5]))
    dual = draw(st.sampled_from([None, None, 2.0, 3.0]))
    if dual is not None:
        o["clip_ratio_c"] = dual
    agg = draw(st.sampled_from([None, *AGG_MODES]))
    if agg is not None:
        o["agg"] = agg
    normalizer = draw(st.sampled_from([None, None, None, 0.0, 3.0, 7.5]))
    if normalizer is not None:
        o["normalizer"] = normalizer
    elif (agg or m.defaults["agg"]) == "seq-mean-token-sum-norm":
        o["max_len"] = draw(st.integers(1, 8))
    if draw(st.booleans()):
        o["kl_coef"] = draw(st.sampled_from([0.04, 0.5]))
        o["kl_estimator"] = draw(st.sampled_from(KL_ESTIMATORS))
    entropy_coef = draw(st.sampled_from([0.0, 0.0, 0.01, -0.02]))
    if entropy_coef:
        o["entropy_coef"] = entropy_coef
    elif draw(st.booleans()):
        o["compute_entropy"] = True
    clamp = draw(st.sampled_from(["default", "default", None, 1.0, 0.5]))
    if clamp != "default":
        o["ratio_log_clamp"] = clamp
    if draw(st.booleans()):
        o["rollout_is_weights"] = True
    if method in ("gppo", "gppo_klear") and draw(st.booleans()):
        o["gppo_beta1"] = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
        o["gppo_beta2"] = draw(st.sampled_from([0.5, 0.75, 1.0, 2.0]))
    if method == "ecpo":
        o["ratio_level"] = draw(st.sampled_from(["token", "sequence"]))
        if draw(st.booleans()):
            # not 0: the early-clipped ratio would then sit exactly on the upper bound
            o["ecpo_delta"] = draw(st.sampled_from([0.05, 0.1, 0.3]))
    if method in ("dppo_tv", "dppo_kl") and draw(st.booleans()):
        o["dppo_is_cap"] = draw(st.sampled_from([1.5, 3.0, 20.0]))
    if method == "vespo" and draw(st.booleans()):
        o.update({n: draw(st.sampled_from([0.0, 0.5, 2.0, 3.0] if "_k_" in n else [0.5, 1.0, 3.0]))
                  for n in VESPO_DEFAULTS})
    if method == "clip_cov":   # always a seed: every backend must draw the same tokens
        o["clip_cov_seed"] = draw(st.sampled_from([0, 1, 2]))
        if draw(st.booleans()):
            o["clip_cov_ratio"] = draw(st.sampled_from([2e-4, 0.3, 1.0]))
            o["clip_cov_lb"], o["clip_cov_ub"] = draw(st.sampled_from([(1.0, 5.0), (-0.5, 0.5), (-5.0, 5.0)]))
    if method == "kl_cov" and draw(st.booleans()):
        o["kl_cov_ratio"] = draw(st.sampled_from([2e-4, 0.3, 1.0]))
        o["kl_cov_coef"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
    if method == "dro":
        o["dro_beta"] = draw(st.sampled_from([1e-3, 0.5, 2.0]))
    if method == "sapo" and draw(st.booleans()):
        o["sapo_tau_pos"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        o["sapo_tau_neg"] = draw(st.sampled_from([0.5, 1.05, 3.0]))
    if method == "gpg":
        how = draw(st.sampled_from(["none", "alpha", "group_size", "group_ids", "verl"]))
        if how == "alpha":
            o["gpg_alpha"] = draw(st.sampled_from([0.0, 1.5]))
        elif how == "group_size":
            o["group_size"] = draw(st.sampled_from([d for d in range(1, max(rows, 1) + 1) if rows % d == 0]))
        elif how == "group_ids":
            o["group_ids"] = tuple(draw(st.lists(st.integers(0, 2), min_size=rows, max_size=rows)))
        if how in ("group_size", "group_ids", "verl") and draw(st.booleans()) or how == "verl":
            o["rewards"] = tuple(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=rows, max_size=rows)))
        if how == "verl":
            o["gpg_alpha_mode"] = "verl_nonzero"
    if method == "bapo":
        how = draw(st.sampled_from(["bounds", "paper", "official_code"]))
        if how == "bounds":
            o["bapo_bounds"] = (draw(st.sampled_from([0.6, 0.7, 0.85])), draw(st.sampled_from([1.2, 1.5, 2.0])))
        else:
            o["bapo_mode"] = how
            if draw(st.booleans()):
                o["bapo_target"] = draw(st.sampled_from([0.3, 0.6]))
    return o


@st.composite
def cases(draw):
    op = draw(st.sampled_from(OPS))
    linear = op.startswith("linear_")
    kind = op.removeprefix("linear_")
    group = op if kind == "token" else ("linear_rows" if linear else "logits_rows")
    layout = draw(st.sampled_from(LAYOUTS[group]))
    dtype = draw(st.sampled_from(["float32", "float32", "bfloat16", "float16", "float64"]))
    # (sampled_from draws near-uniformly; integers() would favour its bounds, and N = 0 half the time)
    big = draw(st.sampled_from([False] * 24 + [True]))        # a real vocabulary one case in 25
    V = draw(st.sampled_from(BIG_V if big else SMALL_V))
    empty = draw(st.sampled_from([False] * 11 + [True]))      # N = 0 one case in 12
    B, T, lengths = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3, 4, 5])), ()
    if empty:
        B, T = draw(st.sampled_from([(0, T), (B, 0), (0, 0)]))
    if big:
        B, T = min(B, 2), min(T, 1)
    if layout == "packed":
        lengths = tuple(draw(st.lists(st.sampled_from([2, 0, 1, 3, 4]), min_size=1, max_size=4)))
        if empty:
            lengths = draw(st.sampled_from([(), tuple(0 for _ in lengths)]))
        if big:
            lengths = tuple(min(n, max(0, 2 - sum(lengths[:i]))) for i, n in enumerate(lengths))
        B, T = len(lengths), max(lengths, default=0)
    kw = dict(op=op, layout=layout, dtype=dtype, B=B, T=T, lengths=lengths, V=V, seed=draw(st.integers(0, 2**31 - 1)))
    kw["temperature"] = draw(st.one_of(st.just(1.0), st.sampled_from([0.3, 0.7, 1.3, 2.0]), st.floats(0.25, 2.5)))
    kw["pattern"] = draw(st.sampled_from(["normal", "peaked", "large"] if linear else
                                         ["normal", "peaked", "shifted_up", "shifted_down", "neginf"]))
    kw["ignore"] = draw(st.sampled_from(["none", "some", "some", "first", "last", "row", "all"]))
    kw["ignore_index"] = draw(st.sampled_from([-100, -1]))
    kw["labels_strided"] = draw(st.booleans())
    kw["garbage"] = draw(st.booleans())
    if kind == "token":
        kw["entropy"] = draw(st.booleans())
    else:
        kw["mask"] = draw(st.sampled_from(["none", "none", "random", "random", "ones", "zeros", "empty_row", "float"]))
    if linear:
        kw.update(H=draw(st.sampled_from([1, 3, 8, 16])), bias=draw(st.booleans()),
                  softcap=draw(st.sampled_from([None, None, 3.0, 30.0])),
                  logit_scale=draw(st.sampled_from([None, None, 0.8, 1.7])),
                  chunk_size=draw(st.sampled_from([None, 1, 2, 3, 5])),
                  weight_transposed=draw(st.booleans()), frozen_weight=draw(st.sampled_from([False] * 5 + [True])))
    options = {}
    if kind == "policy":
        method = draw(st.sampled_from([m for m in method_names() if m in ORACLE_METHODS]))
        options = _policy_options(draw, method, B)
        kw.update(method=method, on_policy=draw(st.sampled_from([False] * 6 + [True])),
                  spread=draw(st.sampled_from([0.1, 0.7, 1.5])), token_adv=draw(st.booleans()),
                  route=draw(st.sampled_from(["autograd", "grad_in_forward"] + ([] if linear else ["inplace_grad"]))))
    elif kind == "sequence":
        options = {"agg": draw(st.sampled_from(["sum", "mean"])), "return_lengths": draw(st.booleans())}
    elif kind == "sft":
        options = {"weighting": draw(st.sampled_from(SFT_WEIGHTINGS))}
        if options["weighting"] == "iw" or draw(st.booleans()):
            options["seq_weights"] = True
        cutoff = draw(st.sampled_from([None, None, 0.5, 0.9, 1.0]))
        if cutoff is not None:
            options["cutoff_prob"] = cutoff
        normalizer = draw(st.sampled_from([None, None, 0.0, 5.0]))
        if normalizer is not None:
            options["normalizer"] = normalizer
    kw["options"] = tuple(sorted(options.items()))
    return Case(**kw)


# --------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass
class Inputs:
    case: Case
    dtype: torch.dtype
    storages: list            # the leaves' storage tensors, in the call's dtype (None: no bias)
    views: list               # storage -> the tensor the op gets, per leaf
    labels: torch.Tensor      # as the op gets them (maybe a strided view)
    mask: torch.Tensor | None
    cu: torch.Tensor | None
    valid: torch.Tensor       # flat [N] bool: the positions that count
    counted: torch.Tensor     # flat [N] bool: label != ignore_index
    member: torch.Tensor      # [rows, N] float64 row membership
    token_shape: tuple
    kwargs: dict              # the op's remaining arguments (CPU tensors)
    oracle_extra: dict        # what the oracle needs besides the logits


def _token_rows(case, shape):
    """Flat index ranges of the rows of the token layout (one row for the flat layouts)."""
    if case.layout == "packed":
        starts = np.cumsum((0,) + case.lengths)
        return [range(int(s), int(s) + n) for s, n in zip(starts, case.lengths)]
    if len(shape) == 1:
        return [range(shape[0])]
    b, t = shape
    return [range(i * t, (i + 1) * t) for i in range(b)]


def _ignored(case, shape, rng):
    n = int(np.prod(shape))
    out = np.zeros(n, bool)
    rows = [r for r in _token_rows(case, shape) if len(r)]
    if case.ignore == "some":
        out = rng.random(n) < 0.3
    elif case.ignore in ("first", "last"):
        for r in rows:
            out[r[0] if case.ignore == "first" else r[-1]] = True
    elif case.ignore == "row" and rows:
        out[list(rows[rng.integers(len(rows))])] = True
    elif case.ignore == "all":
        out[:] = True
    return out


def _mask(case, shape, rng):
    n = int(np.prod(shape))
    if case.mask == "none":
        return None
    m = rng.random(n) > 0.25
    if case.mask == "ones":
        m[:] = True
    elif case.mask == "zeros":
        m[:] = False
    elif case.mask == "empty_row":
        rows = [r for r in _token_rows(case, shape) if len(r)]
        if rows:
            m[list(rows[rng.integers(len(rows))])] = False
    t = torch.from_numpy(m).reshape(shape)
    return t.float() if case.mask == "float" else t


def _strided_labels(labels, case):
    """Labels as a view with stride 2, the slots between them holding labels out of range."""
    if not case.labels_strided:
        return labels
    store = torch.full((*labels.shape, 2), case.V + 3, dtype=labels.dtype)
    store[..., 0] = labels
    return store[..., 0]


def build(case: Case) -> Inputs:
    gen = torch.Generator().manual_seed(case.seed)
    rng = np.random.default_rng(case.seed)
    dtype = DTYPES[case.dtype]
    linear = case.op.startswith("linear_")
    B, T, V, H = case.B, case.T, case.V, case.H
    if case.layout == "packed":
        shape = (sum(case.lengths),)
    elif case.layout in ("flat", "rows_strided"):
        shape = (B * T,)
    else:
        shape = (B, T)
    n = int(np.prod(shape))
    labels_flat = torch.randint(0, V, (n,), generator=gen)
    ignored = _ignored(case, shape, rng)
    labels_flat[torch.from_numpy(ignored)] = case.ignore_index
    kind = case.op.removeprefix("linear_")
    mask = _mask(case, shape, rng) if kind != "token" else None
    counted = labels_flat != case.ignore_index
    valid = counted & (mask.reshape(-1) != 0 if mask is not None else True)

    if case.layout == "shifted":
        # labels[:, 1:] of a [B, T + 1] buffer whose first column is out of range
        store = torch.full((B, T + 1), V + 5, dtype=torch.int64)
        store[:, 1:] = labels_flat.view(B, T)
        labels = store[:, 1:]
    else:
        labels = labels_flat.reshape(shape)
    labels = _strided_labels(labels, case)

    if not linear:
        x = make_logits(n, V, torch.float64, {"large": "normal"}.get(case.pattern, case.pattern), gen)
        if case.pattern == "neginf" and n:
            # the label's own logit stays finite (a -inf label logit makes logp = -inf legitimately)
            rows = torch.arange(n)[counted]
            x[rows, labels_flat[counted]] = torch.randn(len(rows), generator=gen, dtype=torch.float64)
        if case.garbage and (~counted).any():
            x[~counted] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[torch.arange(
                int((~counted).sum())) % 3].unsqueeze(1)
        if case.layout == "shifted":
            store = torch.randn(B, T + 1, V, generator=gen, dtype=torch.float64)
            store[:, :-1] = x.view(B, T, V)
            view = lambda s: s[:, :-1]  # noqa: E731
        elif case.layout == "rows_strided":
            store = torch.randn(2 * n, V, generator=gen, dtype=torch.float64)
            store[::2] = x
            view = lambda s: s[::2]  # noqa: E731
        elif case.layout == "vocab_strided":
            store = x.view(B, T, V).permute(2, 1, 0).contiguous()
            view = lambda s: s.permute(2, 1, 0)  # noqa: E731
        else:
            store = x.reshape(*shape, V)
            view = lambda s: s  # noqa: E731
        storages, views = [store.to(dtype)], [view]
    else:
        h = torch.randn(n, H, generator=gen, dtype=torch.float64)
        W = torch.randn(V, H, generator=gen, dtype=torch.float64) / H ** 0.5 * (8 if case.pattern == "large" else 2)
        if case.pattern == "peaked" and counted.any():
            t0 = int(torch.nonzero(counted)[0])
            W[labels_flat[t0]] = h[t0] / h[t0].norm().clamp(min=1e-3) ** 2 * 50
        if case.layout == "shifted":
            hs = torch.randn(B, T + 1, H, generator=gen, dtype=torch.float64)
            hs[:, :-1] = h.view(B, T, H)
            hview = lambda s: s[:, :-1]  # noqa: E731
        elif case.layout == "transposed":
            hs = h.view(B, T, H).transpose(0, 1).contiguous()
            hview = lambda s: s.transpose(0, 1)  # noqa: E731
        else:
            hs = h.reshape(*shape, H)
            hview = lambda s: s  # noqa: E731
        if case.weight_transposed:
            Ws, wview = W.t().contiguous(), (lambda s: s.t())
        else:
            Ws, wview = W, (lambda s: s)
        bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if case.bias else None
        storages = [hs.to(dtype), Ws.to(dtype), None if bias is None else bias.to(dtype)]
        views = [hview, wview, lambda s: s]

    rows = _token_rows(case, shape)
    cu = torch.tensor(np.cumsum((0,) + case.lengths), dtype=torch.int64) if case.layout == "packed" else None
    member = torch.zeros(len(rows), n, dtype=torch.float64)
    for i, r in enumerate(rows):
        member[i, list(r)] = 1.0
    inp = Inputs(case, dtype, storages, views, labels, mask, cu, valid, counted, member, shape, {}, {})
    if kind == "policy":
        _policy_inputs(inp, rng)
    elif kind == "sequence":
        inp.kwargs.update(mask=mask, cu_seqlens=cu, **dict(case.options))
        inp.oracle_extra["row_weights"] = torch.from_numpy(rng.normal(size=len(rows)))
    elif kind == "sft":
        o = dict(case.options)
        if o.pop("seq_weights", False):
            o["seq_weights"] = torch.from_numpy(rng.uniform(0.0, 2.0, len(rows))).float()
        inp.kwargs.update(mask=mask, cu_seqlens=cu, **o)
    else:
        g = torch.from_numpy(rng.normal(size=n))
        inp.oracle_extra.update(ga=g, gb=torch.from_numpy(rng.normal(size=n)) if case.entropy else torch.zeros(n))
    return inp


# --------------------------------------------------------------------------------------------
# the logits pass in float64 (the oracle) and in a given dtype (eager torch)


def logits_of(inp: Inputs, tensors, dtype, keep=None):
    """The [N, V] logits the op sees, computed in `dtype` from `tensors` (the leaves' storages),
    rows of ignored tokens zeroed (they hold garbage the op never reads). `keep`: a dict that gets
    the lm_head's raw h @ W.T + b (its gradient retained)."""
    case = inp.case
    if case.op.startswith("linear_"):
        h, W, b = (None if t is None else v(t).to(dtype) for t, v in zip(tensors, inp.views))
        z = h.reshape(-1, case.H) @ W.t()
        if b is not None:
            z = z + b
        if keep is not None and z.requires_grad:
            z.retain_grad()
            keep["raw"] = z
        if case.logit_scale is not None:
            z = z * case.logit_scale
        if case.softcap is not None:
            z = case.softcap * torch.tanh(z / case.softcap)
    else:
        z = inp.views[0](tensors[0]).to(dtype).reshape(-1, case.V)
    return torch.where(inp.counted.unsqueeze(1), z, torch.zeros((), dtype=dtype))


def logits_pass(z, labels_flat, counted, temperature):
    """(logp, entropy) per token in z's dtype: log_softmax(z / T), 0 where not counted."""
    lsm = torch.log_softmax(z / temperature, -1)
    lp = lsm.gather(-1, labels_flat.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = lsm.exp()
    ent = -(p * lsm.masked_fill(p == 0, 0.0)).sum(-1)
    zero = torch.zeros((), dtype=z.dtype)
    return torch.where(counted, lp, zero), torch.where(counted, ent, zero)


def flat_labels(inp):
    return inp.labels.reshape(-1)


# --------------------------------------------------------------------------------------------
# the objectives, as functions of the per-token log-probs and entropies (float64, flat [N])


# the fuzz oracle's own defaults of the methods outside policy_oracle.py's shared families (DPPO has a
# formula there now, but its fuzz branch below keeps its own): (family, clip_low, clip_high, dual clip, agg)
# from docs/methods.md 2.11 (GSPO) and 2.19 (BAPO: PPO with the searched absolute bounds)
OTHER_DEFAULTS = {"bapo": ("clip", 0.2, None, None, "token-mean"),
                  "gspo": ("seq", 3e-4, 4e-4, None, "seq-mean-token-mean"),
                  "gspo-token": ("seq", 3e-4, 4e-4, None, "seq-mean-token-mean"),
                  "vespo": ("vespo", 0.2, None, None, "token-mean"),
                  "dppo_tv": ("dppo", 0.2, None, None, "token-mean"),
                  "dppo_kl": ("dppo", 0.2, None, None, "token-mean"),
                  "geo_mean": ("gmpo", 0.2, None, None, "seq-mean-token-mean"),
                  "clip_cov": ("clip_cov", 0.2, None, None, "token-mean"),
                  "kl_cov": ("kl_cov", 0.2, None, None, "token-mean")}
VESPO_DEFAULTS = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}
ORACLE_METHODS = sorted(set(po.METHOD_FAMILY) | set(OTHER_DEFAULTS))


def resolved_knobs(case):
    """The shared knobs with the method's documented defaults applied."""
    o = dict(case.options)
    family, cl, ch, dual, agg = {**po.METHOD_FAMILY, **OTHER_DEFAULTS}[case.method]
    cl = o.get("clip_low", cl)
    ch = o.get("clip_high", cl if ch is None else ch)
    return dict(family=family, clip_low=cl, clip_high=ch, dual=o.get("clip_ratio_c", dual),
                agg=o.get("agg", agg), clamp=o.get("ratio_log_clamp", 20.0))


def ratio_level(case):
    if case.method in ("gspo", "gspo-token"):
        return "sequence"
    return dict(case.options).get("ratio_level", "token") if case.method == "ecpo" else "token"


def bounds_of(case, k):
    """(token-ratio bounds, sequence-ratio bounds) where a loss, its gradient or a clip count jumps."""
    o = dict(case.options)
    lo, hi, dual, family = 1.0 - k["clip_low"], 1.0 + k["clip_high"], k["dual"], k["family"]
    if case.method == "bapo":
        b = o.get("bapo_bounds")
        # the search's candidates (both modes' grids) when the bounds are searched
        main = list(b) if b is not None else [round(0.55 + 0.01 * i, 2) for i in range(251)]
    elif family in ("clip", "gppo", "cispo", "seq", "clip_cov"):
        main = [lo, hi]
    elif family == "ecpo":
        main = [lo, hi, hi + o.get("ecpo_delta", 0.1)]
    elif family == "gmpo":     # the clip is in log space: d = -clip_low, clip_high
        main = [math.exp(-k["clip_low"]), math.exp(k["clip_high"])]
    elif family == "dppo":     # the truncated importance weight min(r, C)
        main = [o.get("dppo_is_cap", 20.0)]
    else:
        main = []
    if dual is not None and main:
        main.append(dual)
    clamp = [] if k["clamp"] is None or family == "reinforce" else [math.exp(-k["clamp"]), math.exp(k["clamp"])]
    main = [b for b in main if b > 0]
    if ratio_level(case) == "sequence":
        return clamp if case.method == "ecpo" else [], main
    return main + clamp, []


def row_log_ratio(case, k, d, valid, member):
    """The per-row log-ratio of the sequence-level methods (float64), broadcast to the tokens."""
    if case.method == "ecpo" and k["clamp"] is not None:
        d = d.clamp(-k["clamp"], k["clamp"])
    d = torch.where(valid, d, torch.zeros((), dtype=d.dtype))
    lengths = member @ valid.double()
    return member.t() @ ((member @ d) / lengths.clamp(min=1))


def gpg_alpha(case, adv_tok, valid, member):
    """GPG's alpha (docs/methods.md 2.15, 00.11): #groups / #groups with a learning signal, over the
    groups that hold a non-empty row; 0 when no group has a signal; verl's B / count_nonzero(R)."""
    o = dict(case.options)
    if o.get("gpg_alpha") is not None:
        return float(o["gpg_alpha"])
    rewards = o.get("rewards")
    if o.get("gpg_alpha_mode") == "verl_nonzero":
        return len(rewards) / max(sum(r != 0 for r in rewards), 1)
    rows = member.shape[0]
    if o.get("group_size") is not None:
        group = [i // o["group_size"] for i in range(rows)]
    elif o.get("group_ids") is not None:
        group = list(o["group_ids"])
    else:
        return 1.0
    nonempty = (member @ valid.double()) > 0
    signal = (member @ (valid & (adv_tok != 0)).double()) > 0
    real = {g for i, g in enumerate(group) if nonempty[i]}

    def has_signal(g):
        members = [i for i in range(rows) if group[i] == g]
        if rewards is not None:
            return len({rewards[i] for i in members}) > 1
        return any(bool(signal[i]) for i in members)
    live = [g for g in real if has_signal(g)]
    return len(real) / len(live) if live else 0.0


def policy_objective(inp, lp, ent):
    """The policy loss (docs/methods.md 1.6-1.12, 2.x) and its metrics (docs/design.md: token-weighted
    over the masked-in tokens, 0 where there are none)."""
    case, x = inp.case, inp.oracle_extra
    k = resolved_knobs(case)
    o = dict(case.options)
    valid, member = inp.valid, inp.member
    zero = torch.zeros((), dtype=torch.float64)

    def tok(t):
        return torch.where(valid, t, zero)
    adv = tok(x["adv_tok"])
    old = lp.detach() if x["old"] is None else tok(x["old"])
    low, high, dual, clamp = 1.0 - k["clip_low"], 1.0 + k["clip_high"], k["dual"], k["clamp"]
    own = {n: o[n] for n in ("gppo_beta1", "gppo_beta2", "ecpo_delta", "sapo_tau_pos", "sapo_tau_neg", "dro_beta")
           if n in o}
    own = {**po._OWN_DEFAULTS.get(case.method, {}), **own}
    d = lp - old
    d_tok = d if clamp is None else d.clamp(-clamp, clamp)
    clip_bounds = (low, high)
    if case.method == "bapo":
        clip_bounds = x["bapo_bounds"]
        phi = po._phi("clip", lp, old, adv, *clip_bounds, dual, clamp, {})
        r_m = torch.exp(d_tok)
    elif ratio_level(case) == "sequence":
        d_row = row_log_ratio(case, k, d, valid, member)
        if case.method == "ecpo":
            shift = math.log1p(k["clip_high"] + own["ecpo_delta"])
            r = torch.exp(d_row - (d_row.detach() - shift).clamp(min=0))
            r_m = torch.exp(d_row.clamp(max=shift))
        else:
            log_s = d_row.detach() + lp - lp.detach() if case.method == "gspo-token" else d_row
            r = torch.exp(log_s if clamp is None else log_s.clamp(max=10.0))
            r_m = torch.exp(d_row if clamp is None else d_row.clamp(max=10.0))
        phi = torch.maximum(-adv * r, -adv * r.clamp(low, high))
        if dual is not None:
            phi = torch.where(adv < 0, torch.minimum(phi, -dual * adv), phi)
    elif k["family"] == "dppo":
        # docs/methods.md 2.35: -sg(min(r, C)) A logp inside the trust region of p = pi(y_t), bounded
        # on the side A pushes (TV: p - p_old; KL: the binary KL, or p past p_old the other way)
        cap = o.get("dppo_is_cap", 20.0)
        r_m, clip_bounds = torch.exp(d_tok), None
        p, p_old = lp.detach().exp(), old.exp()
        up = adv > 0
        if case.method == "dppo_tv":
            inside = torch.where(up, p - p_old <= k["clip_high"], p - p_old >= -k["clip_low"])
            margin = torch.where(up, p - p_old - k["clip_high"], p - p_old + k["clip_low"]).abs()
        else:
            kl = p_old * (old - lp.detach()) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
            inside = torch.where(up, (kl <= k["clip_high"]) | (p <= p_old), (kl <= k["clip_low"]) | (p >= p_old))
            margin = torch.where((p - p_old).abs() < 1e-3, torch.ones_like(p),
                                 (kl - torch.where(up, k["clip_high"], k["clip_low"])).abs())
        x["dppo_margin"] = float(margin[valid].min()) if valid.any() else 1.0
        phi = -(r_m.clamp(max=cap) * inside).detach() * adv * lp
        method_metrics = {"dppo/outside": tok((~inside).double()).sum(),
                          "dppo/truncated": tok((inside & (r_m > cap)).double()).sum()}
    elif k["family"] == "gmpo":
        # docs/methods.md 2.36: the geometric mean of the token ratios, each log-ratio clipped in
        # log space on the side sgn(A) pushes; phi = -mean_row(A) s_row on every token
        sign = torch.sign(adv)
        d_min = sign * torch.minimum(sign * d_tok, sign * d_tok.clamp(-k["clip_low"], k["clip_high"]))
        lengths = (member @ valid.double()).clamp(min=1)
        r = member.t() @ torch.exp((member @ tok(d_min)) / lengths)
        phi = -(member.t() @ ((member @ adv) / lengths)) * r
        r_m, clip_bounds = r, None
    elif k["family"] in ("clip_cov", "kl_cov"):
        # docs/methods.md 2.44: the covariance (A - mean A)(logp - mean logp) over the valid tokens picks
        # tokens: Clip-Cov drops a seeded random draw of the PPO-unclipped ones inside (lb, ub), KL-Cov adds
        # coef |log r| to the k of largest covariance (the earlier first among equal ones)
        nv = max(int(valid.sum()), 1)
        lpd = tok(lp.detach())
        cov = (adv - adv.sum() / nv) * (lpd - lpd.sum() / nv)
        r_m = torch.exp(d_tok)
        idx = valid.nonzero().squeeze(1)
        if k["family"] == "clip_cov":
            ratio_, lb, ub = o.get("clip_cov_ratio", 2e-4), o.get("clip_cov_lb", 1.0), o.get("clip_cov_ub", 5.0)
            rd = r_m.detach()
            ppo = ((adv > 0) & (rd > high)) | ((adv < 0) & (rd < low))
            cand = (valid & ~ppo & (cov > lb) & (cov < ub)).nonzero().squeeze(1)
            drop = torch.zeros_like(valid)
            if cand.numel():
                perm = torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(o["clip_cov_seed"]))
                drop[cand[perm[:max(int(ratio_ * int(valid.sum())), 1)]]] = True
            r = torch.exp(d_tok)
            phi = torch.maximum(-adv * r, -adv * r.clamp(low, high))
            if dual is not None:
                phi = torch.where(adv < 0, torch.minimum(phi, -dual * adv), phi)
            phi = torch.where(drop, zero, phi)
            x["cov_margin"] = float(min(e[valid].min() if valid.any() else 1.0 for e in
                                        ((cov - lb).abs(), (cov - ub).abs())))
            method_metrics = {"clip_cov/clipped": drop.double().sum()}
        else:
            ratio_, coef = o.get("kl_cov_ratio", 2e-4), o.get("kl_cov_coef", 0.1)
            sel = torch.zeros_like(valid)
            margin = 1.0
            if idx.numel():
                vals = cov[idx]
                order = torch.sort(vals, descending=True, stable=True)
                kk = max(int(idx.numel() * ratio_), 1)
                sel[idx[order.indices[:kk]]] = True
                if kk < idx.numel():
                    # level covariances (N = 2 always ties in exact arithmetic) are broken by each side's
                    # rounding: the tie rule is tested on its own (test_integration_verl_losses)
                    margin = float(order.values[kk - 1] - order.values[kk])
                if coef and x["old"] is not None:
                    margin = min(margin, float((lp.detach() - old).abs()[sel].min()))   # |log r|'s kink at 0
            x["cov_margin"] = margin
            phi = -torch.exp(d_tok) * adv + torch.where(sel, coef * (lp - old).abs(), zero)
            method_metrics = {"kl_cov/selected": sel.double().sum(),
                              "kl_cov/abs_kl": tok((lp.detach() - old).abs()).sum()}
        if k["family"] == "kl_cov":
            clip_bounds = None
    elif case.method == "vespo":
        # docs/methods.md 2.34: log w = clamp(sum of the row's (clamped) log-ratios, log 1e-8, 20),
        # g(w) = e^lambda w^k e^(-lambda w) by the sign of A, phi = -sg(g) A logp
        v = {**VESPO_DEFAULTS, **{n: o[n] for n in VESPO_DEFAULTS if n in o}}
        log_w = member.t() @ (member @ tok(d_tok)).clamp(math.log(1e-8), 20.0)
        pos = adv >= 0
        k_, lam = (torch.where(pos, torch.full_like(adv, v["vespo_k_pos"]), torch.full_like(adv, v["vespo_k_neg"])),
                   torch.where(pos, torch.full_like(adv, v["vespo_lambda_pos"]),
                               torch.full_like(adv, v["vespo_lambda_neg"])))
        gate = torch.exp(lam + k_ * log_w - lam * torch.exp(log_w))
        phi = -gate.detach() * adv * lp
        r_m, clip_bounds = torch.exp(d_tok), None
        lengths = member @ valid.double()
        per_row = (member @ tok(gate)) / lengths.clamp(min=1)
        vespo_mean = per_row.sum() / max(int((lengths > 0).sum()), 1)
    else:
        if case.method == "gpg":
            own["gpg_alpha"] = x["gpg_alpha"]
        phi = po._phi(k["family"], lp, old, adv, low, high, dual, clamp, own)
        if k["family"] == "ecpo":
            r_m = torch.exp(d_tok.clamp(max=math.log1p(k["clip_high"] + own["ecpo_delta"])))
        else:
            r_m = torch.exp(d_tok)
        if k["family"] not in ("clip", "gppo", "cispo", "ecpo"):
            clip_bounds = None
    if x["isw"] is not None:
        phi = phi * tok(x["isw"])

    def agg(t):   # (the oracle reads max_len before an explicit normaliser replaces it)
        return po.aggregate(t, valid, member, k["agg"], o.get("max_len", 1), o.get("normalizer"))
    pg = agg(phi)
    loss, scale = pg, agg(phi.detach().abs())
    n = max(int(valid.sum()), 1)
    rv = tok(r_m)
    outputs = {"metrics/pg_loss": pg, "metrics/approx_kl": tok(old - lp).sum() / n,
               "metrics/ratio/mean": rv.sum() / n,
               "metrics/ratio/max": torch.where(valid, r_m, -math.inf).max() if valid.any() else zero}
    scales = {"metrics/pg_loss": float(scale), "metrics/approx_kl": float(tok(old.abs() + lp.abs()).detach().sum()) / n,
              "metrics/ratio/mean": float(rv.detach().sum()) / n,
              "metrics/ratio/max": float(outputs["metrics/ratio/max"].detach())}
    if k["family"] in ("dppo", "clip_cov", "kl_cov"):
        for name, v in method_metrics.items():
            outputs[f"metrics/{name}"] = v / n
            scales[f"metrics/{name}"] = float(v.detach()) / n if name == "kl_cov/abs_kl" else 0.0
    if case.method == "vespo":
        outputs["metrics/vespo/phi_seq_mean"] = vespo_mean
        scales["metrics/vespo/phi_seq_mean"] = float(vespo_mean.detach())
    if clip_bounds is not None:
        low_c = (valid & (r_m < clip_bounds[0]) & (adv < 0)).double()
        high_c = (valid & (r_m > clip_bounds[1]) & (adv > 0)).double()
        outputs.update({"metrics/clip_ratio/low": low_c.sum() / n, "metrics/clip_ratio/high": high_c.sum() / n,
                        "metrics/clip_ratio/region": (low_c + high_c).sum() / n})
        scales.update({f"metrics/clip_ratio/{s}": 0.0 for s in ("low", "high", "region")})
    if o.get("kl_coef"):
        kl = tok(po.kl_value(lp, tok(x["ref"]), o["kl_estimator"]))
        loss = loss + o["kl_coef"] * agg(kl)
        scale = scale + o["kl_coef"] * agg(kl.detach().abs())
        outputs["metrics/kl"] = kl.sum() / n
        scales["metrics/kl"] = float(kl.detach().abs().sum()) / n
    if o.get("entropy_coef"):
        loss = loss - o["entropy_coef"] * agg(ent)
        scale = scale + abs(o["entropy_coef"]) * agg(ent.detach())
    if o.get("entropy_coef") or o.get("compute_entropy"):
        outputs["metrics/entropy"] = tok(ent).sum() / n
        scales["metrics/entropy"] = float(outputs["metrics/entropy"].detach())
    outputs["loss"] = loss
    scales["loss"] = float(scale)
    return loss, outputs, scales


def sequence_objective(inp, lp, ent):
    lengths = inp.member @ inp.valid.double()
    sums = inp.member @ torch.where(inp.valid, lp, torch.zeros((), dtype=torch.float64))
    if dict(inp.case.options)["agg"] == "mean":
        sums = sums / lengths.clamp(min=1)
    scale = max([1.0] + [float((inp.member[i] * lp.detach().abs()).sum()) for i in range(len(sums))])
    return (sums * inp.oracle_extra["row_weights"]).sum(), {"seq": sums}, {"seq": scale}


def sft_objective(inp, lp, ent):
    """-(1/N) sum_t m_t w_t logp_t (docs/methods.md 2.25, 2.27-2.29, 00.2): w = 1, sg(p), sg(p(1-p))
    or 1, times the row's sequence weight; cutoff_prob clamps logp <= log(cutoff) in the term only."""
    o = dict(inp.case.options)
    valid, zero = inp.valid, torch.zeros((), dtype=torch.float64)
    p = lp.detach().exp()
    w = {"none": torch.ones_like(p), "dft": p, "chord_phi": p * (1 - p), "iw": torch.ones_like(p)}[o["weighting"]]
    if o.get("seq_weights") is not None:
        w = w * (inp.member.t() @ inp.kwargs["seq_weights"].double())
    w = torch.where(valid, w, zero)
    cutoff = o.get("cutoff_prob")
    terms = -(lp.clamp(max=math.log(cutoff)) if cutoff is not None and cutoff < 1 else lp)
    count = float(valid.sum())
    den = o.get("normalizer", count)
    inv = 1.0 / den if den > 0 else 0.0
    loss = torch.where(valid, w * terms, zero).sum() * inv
    n = max(count, 1.0)
    outputs = {"loss": loss, "metrics/nll": torch.where(valid, -lp, zero).sum() * inv,
               "metrics/weight/mean": w.sum() / n, "metrics/prob/mean": torch.where(valid, lp.exp(), zero).sum() / n}
    scale = float(torch.where(valid, (w * terms).abs(), zero).detach().sum()) * inv
    nll_scale = float(torch.where(valid, lp.detach().abs(), zero).sum()) * inv
    return loss, outputs, {"loss": scale, "metrics/nll": nll_scale, "metrics/weight/mean": 1.0,
                           "metrics/prob/mean": 1.0}


def token_objective(inp, lp, ent):
    x = inp.oracle_extra
    outputs = {"logp": lp}
    if inp.case.entropy:
        outputs["entropy"] = ent
    ref = torch.cat([lp.detach(), ent.detach()]) if inp.case.entropy else lp.detach()
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return (lp * x["ga"]).sum() + (ent * x["gb"]).sum(), outputs, {"logp": scale, "entropy": scale}


OBJECTIVES = {"token": token_objective, "policy": policy_objective, "sequence": sequence_objective,
              "sft": sft_objective}


# --------------------------------------------------------------------------------------------
# policy inputs: old log-probs kept away from the clip bounds, advantages, KL reference, weights


def nudge(case, k, lp, old, valid, member, token_bounds, row_bounds, dtype):
    """old_logp (rounded to `dtype`) moved down until no ratio lies within GAP of a bound: the
    ratios only grow, so the bounds are passed in ascending order."""
    for _ in range(100):
        moved = False
        old = old.to(dtype).double()
        d = lp - old
        for b in sorted(token_bounds):
            close = valid & ((torch.exp(d) / b - 1).abs() < GAP)
            if close.any():
                old = torch.where(close, old - 4 * GAP, old)
                d, moved = lp - old, True
        for b in sorted(row_bounds):
            s = torch.exp(row_log_ratio(case, k, d, valid, member))
            close = valid & ((s / b - 1).abs() < GAP)
            if close.any():
                old = torch.where(close, old - 4 * GAP, old)
                d, moved = lp - old, True
        if not moved:
            return old.to(dtype)
    raise AssertionError("could not move the ratios off the clip bounds")


def _policy_inputs(inp: Inputs, rng):
    case = inp.case
    o = dict(case.options)
    cdtype = torch.float64 if inp.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        lp, _ = logits_pass(logits_of(inp, inp.storages, torch.float64), flat_labels(inp), inp.counted,
                            case.temperature)
    n, rows = lp.numel(), inp.member.shape[0]
    valid, member = inp.valid, inp.member
    adv_rows = rng.normal(size=rows) * (rng.random(rows) > 0.2)
    adv_tok_np = rng.normal(size=n) * (rng.random(n) > 0.2)
    if case.token_adv:
        adv = torch.from_numpy(adv_tok_np)
        adv_tok = adv.clone()
    else:
        adv = torch.from_numpy(adv_rows)
        # packed with as many rows as tokens: [B] is also [N], and a tensor shaped like the
        # log-probs is per token (docs/api.md, layout.per_token; the fuzzer's first oracle took it
        # per row: see the @example below)
        adv_tok = adv.clone() if inp.cu is not None and rows == n else member.t() @ adv
    adv = adv.to(cdtype).double()
    adv_tok = adv_tok.to(cdtype).double()
    garbage = torch.tensor([math.nan, math.inf, -1e4], dtype=torch.float64)

    def spoil(t):
        """NaN / inf / -1e4 where the loss must not read (not valid)."""
        if not case.garbage or t.numel() != n:
            return t
        return torch.where(valid, t, garbage[torch.arange(n) % 3].to(t.dtype))
    k = resolved_knobs(case)
    ex = inp.oracle_extra
    ex["gpg_alpha"] = gpg_alpha(case, adv_tok, valid, member) if case.method == "gpg" else None
    old = None
    if not case.on_policy:
        old = lp - torch.from_numpy(rng.uniform(-case.spread, case.spread, n))
        token_bounds, row_bounds = bounds_of(case, k)
        old = nudge(case, k, lp, old, valid, member, token_bounds, row_bounds, cdtype)
    ex["bapo_bounds"] = None
    if case.method == "bapo":
        if o.get("bapo_bounds") is not None:
            ex["bapo_bounds"] = tuple(o["bapo_bounds"])
        else:
            # the search on the oracle's ratios, and whether a hair's change in them could change it
            d = lp - (lp if old is None else old.double())
            if k["clamp"] is not None:
                d = d.clamp(-k["clamp"], k["clamp"])
            r = torch.where(valid, torch.exp(d), torch.zeros((), dtype=torch.float64)).numpy()
            kw = dict(mode=o.get("bapo_mode", "paper"))
            target = o.get("bapo_target", 1.0 if kw["mode"] == "official_code" else 0.4)
            found = {bapo_search_loop(r, adv_tok.numpy(), valid.numpy(), target=target * f, **kw)
                     for f in (1 - 1e-4, 1.0, 1 + 1e-4)}
            assume(len(found) == 1)
            ex["bapo_bounds"] = found.pop()
    ex["old"] = None if old is None else old.double()
    ex["adv_tok"] = adv_tok
    ex["ref"] = (lp + torch.from_numpy(rng.normal(size=n)) * 0.5).to(cdtype).double() if o.get("kl_coef") else None
    ex["isw"] = torch.from_numpy(rng.uniform(0.5, 2.0, n)).to(cdtype).double() if o.get("rollout_is_weights") else None

    def as_call(t):
        return None if t is None else spoil(t).to(cdtype).reshape(inp.token_shape)
    kw = {name: v for name, v in o.items() if name not in ("rollout_is_weights", "group_ids", "rewards")}
    if case.token_adv:
        adv_call = as_call(adv)
    else:
        adv_call = adv.to(cdtype)
        if case.garbage and not (inp.cu is not None and rows == n):   # an empty row's advantage is never read
            empty = (member @ valid.double()) == 0
            adv_call = torch.where(empty, torch.full_like(adv_call, math.nan), adv_call)
    kw.update(method=case.method, old_logp=as_call(ex["old"]), advantages=adv_call, mask=inp.mask,
              cu_seqlens=inp.cu, ref_logp=as_call(ex["ref"]), rollout_is_weights=as_call(ex["isw"]))
    if o.get("group_ids") is not None:
        kw["group_ids"] = torch.tensor(o["group_ids"])
    if o.get("rewards") is not None:
        kw["rewards"] = torch.tensor(o["rewards"])
    inp.kwargs.update({name: v for name, v in kw.items() if v is not None or name in ("old_logp", "mask")})


# --------------------------------------------------------------------------------------------
# running a backend


def to(dev, v):
    return v.to(dev) if isinstance(v, torch.Tensor) else v


def run(inp: Inputs, backend: str):
    """(outputs, grads of the leaves, metrics, dtypes, shapes) of one backend, all brought to CPU."""
    case = inp.case
    dev = device_of(backend)
    leaves = [None if s is None else s.detach().to(dev).clone().requires_grad_(not (i == 1 and case.frozen_weight))
              for i, s in enumerate(inp.storages)]
    inplace = case.route == "inplace_grad"
    args = [None if t is None else v(t * 1 if inplace else t) for t, v in zip(leaves, inp.views)]
    labels = to(dev, inp.labels)
    kw = {k: to(dev, v) for k, v in inp.kwargs.items()}
    common = dict(temperature=case.temperature, ignore_index=case.ignore_index, backend=backend)
    linear = case.op.startswith("linear_")
    if linear:
        common.update(softcap=case.softcap, logit_scale=case.logit_scale, chunk_size=case.chunk_size)
    kind = case.op.removeprefix("linear_")
    out, metrics = {}, {}
    if kind == "token":
        f = ao.fused_linear_token_logprobs if linear else ao.token_logprobs
        call = (args[0], args[1], labels, args[2]) if linear else (args[0], labels)
        res = f(*call, compute_entropy=case.entropy, **common)
        lp, ent = res if case.entropy else (res, None)
        out["logp"] = lp
        total = (lp.double().cpu() * inp.oracle_extra["ga"].reshape(lp.shape)).sum()
        if ent is not None:
            out["entropy"] = ent
            total = total + (ent.double().cpu() * inp.oracle_extra["gb"].reshape(ent.shape)).sum()
    elif kind == "policy":
        kw = dict(kw)
        old, adv, mask = kw.pop("old_logp"), kw.pop("advantages"), kw.pop("mask")
        route = {"grad_in_forward": dict(grad_in_forward=True), "inplace_grad": dict(inplace_grad=True)}.get(
            case.route, {})
        if linear:
            res = ao.fused_linear_policy_loss(args[0], args[1], labels, old, adv, mask, bias=args[2], **route,
                                              **common, **kw)
        else:
            res = ao.fused_policy_loss(args[0], labels, old, adv, mask, **route, **common, **kw)
        out["loss"], metrics, total = res.loss, res.metrics, res.loss
    elif kind == "sequence":
        kw = dict(kw)
        mask, agg = kw.pop("mask"), kw.pop("agg")
        if linear:
            res = ao.fused_linear_sequence_logprobs(args[0], args[1], labels, mask, agg, bias=args[2], **common, **kw)
        else:
            res = ao.sequence_logprobs(args[0], labels, mask, agg, **common, **kw)
        if kw.get("return_lengths"):
            res, out["lengths"] = res
        out["seq"] = res
        total = (res.double().cpu() * inp.oracle_extra["row_weights"]).sum()
    else:
        kw = dict(kw)
        mask, weighting = kw.pop("mask"), kw.pop("weighting")
        if linear:
            res = ao.fused_linear_sft_loss(args[0], args[1], labels, mask, weighting, bias=args[2], **common, **kw)
        else:
            res = ao.sft_loss(args[0], labels, mask, weighting, **common, **kw)
        out["loss"], metrics, total = res.loss, res.metrics, res.loss
    dtypes = {k: v.dtype for k, v in out.items()}
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    if total.requires_grad:
        total.backward()
    grads = [None if t is None else (None if t.grad is None else t.grad.detach().cpu()) for t in leaves]
    out = {k: v.detach().cpu() for k, v in out.items()}
    return out, grads, {k: v.detach().cpu() for k, v in metrics.items()}, dtypes, shapes


# --------------------------------------------------------------------------------------------
# the oracle, eager torch, and the bounds


@dataclasses.dataclass
class Reference:
    outputs: dict        # name -> float64 tensor
    bounds: dict         # name -> float64 tensor (the allowed |error| per element)
    grads: list          # per leaf: float64 gradient (storage layout) or None
    grad_bounds: list    # per leaf: allowed |error| (a tensor broadcastable to the gradient)
    lengths: torch.Tensor
    valid_any: bool
    max_lp_err: float    # the largest per-token logp error allowed (twice eager's, at least 4 eps)


def _evaluate(kind, inp, lp, ent):
    """The objective's outputs (flattened) and its per-token coefficient dL/dlogp at (lp, ent)."""
    lp_l, ent_l = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, outputs, _ = OBJECTIVES[kind](inp, lp_l, ent_l)
    a = (torch.autograd.grad(loss, lp_l, allow_unused=True, materialize_grads=True)[0] if loss.requires_grad
         else torch.zeros_like(lp))
    return {name: y.detach().reshape(-1) for name, y in outputs.items()}, a


def reference(inp: Inputs) -> Reference:
    case = inp.case
    linear = case.op.startswith("linear_")
    kind = case.op.removeprefix("linear_")
    labels = flat_labels(inp)
    tol = 1e-10 if inp.dtype == torch.float64 else 1e-5
    eps = torch.finfo(torch.float64 if inp.dtype == torch.float64 else torch.float32).eps
    T = case.temperature

    # float64: the logits pass, then the objective of (logp, entropy) leaves
    leaves = [None if s is None else s.detach().double().requires_grad_() for s in inp.storages]
    keep = {}
    lp, ent = logits_pass(logits_of(inp, leaves, torch.float64, keep), labels, inp.counted, T)
    cutoff = dict(case.options).get("cutoff_prob") if kind == "sft" else None
    if cutoff is not None and cutoff < 1:
        # CHORD's cutoff clamps logp at log(cutoff): a token's gradient jumps there (measure zero)
        assume(not (inp.valid & ((lp.detach() - math.log(cutoff)).abs() < GAP)).any())
    lp_l, ent_l = lp.detach().requires_grad_(), ent.detach().requires_grad_()
    loss, outputs, scales = OBJECTIVES[kind](inp, lp_l, ent_l)
    # DPPO's trust region is a hard edge in p = pi(y_t): no token within 1e-4 of it
    assume(inp.oracle_extra.get("dppo_margin", 1.0) > 1e-4)
    # Clip-Cov's (lb, ub) and KL-Cov's k-th largest covariance are hard edges too
    assume(inp.oracle_extra.get("cov_margin", 1.0) > 1e-4)
    if loss.requires_grad:
        a, b = torch.autograd.grad(loss, (lp_l, ent_l), allow_unused=True, materialize_grads=True)
    else:   # nothing counts (or a zero normaliser): the objective is a constant
        a, b = torch.zeros_like(lp_l), torch.zeros_like(ent_l)
    torch.autograd.backward([lp, ent], [a.detach(), b.detach()])
    grads = [None if t is None else t.grad.detach().clone() for t in leaves]

    # eager torch: the values' logits pass in the dtype eager torch would use, and the gradients
    # through the logits pass in the call's dtype with the oracle's per-token coefficients a, b
    values_dtype = inp.dtype if (linear or inp.dtype == torch.float64) else torch.float32
    with torch.no_grad():
        lp_e, ent_e = logits_pass(logits_of(inp, inp.storages, values_dtype), labels, inp.counted, T)
    lp_err = 2 * (lp_e.double() - lp.detach()).abs() + 4 * eps * (1 + lp.detach().abs())
    ent_err = 2 * (ent_e.double() - ent.detach()).abs() + 4 * eps * (1 + ent.detach().abs())
    if inp.dtype == torch.float64:
        # the oracle computes in fp64 too, so its own error counts: its sum of V exponentials errs up to
        # gamma_V of the sum (Higham 3.1), which eager may happen to share bit for bit and a kernel not
        g = case.V * eps / (1 - case.V * eps)
        lp_err = lp_err + g * (1 + lp.detach().abs())
        ent_err = ent_err + g * (1 + ent.detach().abs())
    e_leaves = [None if s is None else s.detach().clone().requires_grad_() for s in inp.storages]
    lp_g, ent_g = logits_pass(logits_of(inp, e_leaves, inp.dtype), labels, inp.counted, T)
    torch.autograd.backward([lp_g, ent_g], [a.detach().to(inp.dtype), b.detach().to(inp.dtype)])

    # the first-order effect of the logp / entropy errors on each output and on the per-token
    # coefficient a (ratios, KL curvature, and the stop-gradient weights: CISPO's clipped ratio,
    # VESPO's gate, DFT's p), by central differences of the float64 objective
    lp0, ent0 = lp.detach(), ent.detach()
    out_err = {name: torch.zeros(y.numel(), dtype=torch.float64) for name, y in outputs.items()}
    a_err = torch.zeros_like(lp0)
    if kind == "token":
        out_err["logp"] = lp_err.clone()
        if "entropy" in out_err:
            out_err["entropy"] = ent_err.clone()
    else:
        uses_entropy = kind == "policy" and bool(dict(case.options).get("entropy_coef")
                                                 or dict(case.options).get("compute_entropy"))
        for t in torch.nonzero(inp.valid).reshape(-1).tolist():
            step = 1e-6 * max(1.0, abs(float(lp0[t])))
            e = torch.zeros_like(lp0)
            e[t] = step
            hi, lo = _evaluate(kind, inp, lp0 + e, ent0), _evaluate(kind, inp, lp0 - e, ent0)
            for name in out_err:
                out_err[name] += (hi[0][name] - lo[0][name]).abs() / (2 * step) * lp_err[t]
            a_err += (hi[1] - lo[1]).abs() / (2 * step) * lp_err[t]
            if uses_entropy:
                e[t] = 1e-6 * max(1.0, abs(float(ent0[t])))
                hi, lo = _evaluate(kind, inp, lp0, ent0 + e), _evaluate(kind, inp, lp0, ent0 - e)
                for name in out_err:
                    out_err[name] += (hi[0][name] - lo[0][name]).abs() / (2 * e[t]) * ent_err[t]
    # each output: tol x its scale, plus that
    bounds = {}
    for name, y in outputs.items():
        bounds[name] = out_err[name].reshape(y.shape) + tol * scales[name] + (
            1e-7 if tol == 1e-5 and y.dim() == 0 else 0.0)
        outputs[name] = y.detach()

    a, b = a.detach(), b.detach()
    coef = float((a.abs() + b.abs()).max()) if a.numel() else 0.0
    # bf16/fp16 gradients: one rounding of each result to the dtype, and for the fused lm_head one
    # of dL/dz_raw too, which the GEMMs then carry (as autograd hands the GEMMs dz in the dtype)
    u = torch.finfo(inp.dtype).eps / 2 if inp.dtype in (torch.bfloat16, torch.float16) else 0.0
    g_raw = keep["raw"].grad.abs() if "raw" in keep and keep["raw"].grad is not None else None
    # the fused lm_head's GEMMs accumulate n products in fp32 (fp64), n = V for dhidden and N for
    # dweight and dbias: whatever order they sum in, the error is within gamma_n = n u / (1 - n u) of
    # the terms' absolute sum (Higham, Accuracy and Stability, 3.1); the GEMM of the exact dL/dz
    # errs as much, and so does eager's (by chance less on some inputs, see the @examples)
    u_acc = torch.finfo(torch.float64 if inp.dtype == torch.float64 else torch.float32).eps / 2
    dz_err = a_err / T     # bounds the error of every entry of token t's dL/dz
    grad_bounds = []
    for i, (g, e) in enumerate(zip(grads, e_leaves)):
        if g is None:
            grad_bounds.append(None)
            continue
        gview = inp.views[i](g)
        eager = 2 * float((inp.views[i](e.grad).double() - gview).abs().max()) if gview.numel() else 0.0
        if not linear:
            gmax = max(float(gview.abs().max()) if gview.numel() else 0.0, coef / T)
            jerr = float(dz_err.max()) if dz_err.numel() else 0.0
            grad_bounds.append(tol * gmax + eager + jerr + u * gview.abs())
            continue
        # the fused lm_head: dL/dz_raw per entry is at most (coef / T) * |logit_scale| (tanh' <= 1),
        # and sum_v |dL/dz_v| at most twice that; the GEMMs carry it (and its error) to h, W, b
        h = inp.views[0](inp.storages[0]).double().reshape(-1, case.H).abs()
        W = inp.views[1](inp.storages[1]).double().abs()
        ls = abs(case.logit_scale or 1.0)
        per_token, per_token_err = coef / T * ls + dz_err * ls, dz_err * ls
        if i == 0:
            cancel = (2 * per_token.unsqueeze(1) * W.max(0).values).reshape(gview.shape)
            jerr = (2 * per_token_err.unsqueeze(1) * W.max(0).values).reshape(gview.shape)
        elif i == 1:
            cancel = (per_token.unsqueeze(1) * h).sum(0).expand(gview.shape)
            jerr = (per_token_err.unsqueeze(1) * h).sum(0).expand(gview.shape)
        else:
            cancel = per_token.sum().expand(gview.shape)
            jerr = per_token_err.sum().expand(gview.shape)
        gmax = float(torch.maximum(gview.abs(), cancel).max()) if gview.numel() else 0.0
        rounding = u * gview.abs()
        if g_raw is not None:
            terms = (g_raw @ W if i == 0 else g_raw.t() @ h if i == 1 else g_raw.sum(0)).reshape(gview.shape)
            n_sum = case.V if i == 0 else g_raw.shape[0]
            rounding = rounding + (u + n_sum * u_acc / (1 - n_sum * u_acc)) * terms
        grad_bounds.append(tol * gmax + eager + jerr + rounding)
    lengths = (inp.member @ inp.valid.double()).to(torch.int64)
    max_lp_err = float(lp_err[inp.valid].max()) if inp.valid.any() else 0.0
    return Reference(outputs, bounds, grads, grad_bounds, lengths, bool(inp.valid.any()), max_lp_err)


# --------------------------------------------------------------------------------------------
# the checks


def check(inp: Inputs, ref: Reference, backend: str, got):
    case = inp.case
    out, grads, metrics, dtypes, shapes = got
    what = f"{backend}: {case}"
    want_dtype = torch.float64 if inp.dtype == torch.float64 else torch.float32
    kind = case.op.removeprefix("linear_")
    for name, y in out.items():
        if name == "lengths":
            assert y.dtype == torch.int64 and torch.equal(y, ref.lengths), (what, y, ref.lengths)
            continue
        assert dtypes[name] == want_dtype, (what, name, dtypes[name])
        want = ref.outputs[name]
        assert shapes[name] == (tuple(inp.token_shape) if kind == "token" else tuple(want.shape)), \
            (what, name, shapes[name])
        y = y.double().reshape(want.shape)
        assert torch.isfinite(y).all(), (what, name, y)
        err = (y - want).abs()
        bad = err > ref.bounds[name]
        assert not bad.any(), (f"{what}\n{name}: error {err[bad].max().item():.3g} > bound "
                               f"{ref.bounds[name][bad].min().item():.3g}; got {y[bad][:4].tolist()} "
                               f"want {want[bad][:4].tolist()}")
    if kind == "token":
        for name, y in out.items():   # ignored positions hold exactly 0
            assert (y.reshape(-1)[~inp.counted] == 0).all(), (what, name)
        if case.op == "linear_token" and inp.dtype in (torch.bfloat16, torch.float16):
            # verl's log-prob tolerance for a bf16 lm_head (fp32 logits from the GEMM)
            err = (out["logp"].double().reshape(-1) - ref.outputs["logp"]).abs()
            assert (err <= 1e-3 + 2e-4 * ref.outputs["logp"].abs()).all(), (what, "verl tolerance", err.max())
    if kind == "sequence":   # an empty row's log-prob is exactly 0
        assert (out["seq"][ref.lengths == 0] == 0).all(), (what, out["seq"], ref.lengths)
    if kind in ("policy", "sft"):
        normalizer = dict(case.options).get("normalizer")
        if not ref.valid_any or normalizer == 0.0:
            assert out["loss"].item() == 0.0, (what, "an empty loss must be exactly 0", out["loss"])
            for g in grads:
                assert g is None or (g == 0).all(), (what, "an empty loss must have a zero gradient")
        for name, v in metrics.items():
            assert v.dtype == torch.float32 and v.dim() == 0, (what, name, v)
            # BAPO's official-code statistic is +inf when no token has a negative advantage
            assert torch.isfinite(v) or (name == "bapo/rho" and v.item() == math.inf), (what, name, v)
            if f"metrics/{name}" in ref.outputs:
                want, bound = ref.outputs[f"metrics/{name}"], ref.bounds[f"metrics/{name}"]
                assert abs(v.double() - want) <= bound + 2e-7 * max(1.0, abs(want.item())), \
                    (what, name, v.item(), want.item(), bound.item())
        if case.method == "bapo":
            for i, name in enumerate(("bapo/clip_low", "bapo/clip_high")):
                assert metrics[name].item() == np.float32(inp.oracle_extra["bapo_bounds"][i]), (what, name)
        if case.method == "gpg" and kind == "policy":
            assert abs(metrics["gpg/alpha"].item() - inp.oracle_extra["gpg_alpha"]) <= 1e-6 * max(
                1.0, inp.oracle_extra["gpg_alpha"]), (what, metrics["gpg/alpha"], inp.oracle_extra["gpg_alpha"])
    # gradients: each leaf that asked for one has one, with the leaf's dtype, close to the oracle,
    # exactly 0 outside the view and at positions that do not count
    for i, (g, want, bound) in enumerate(zip(grads, ref.grads, ref.grad_bounds)):
        storage = inp.storages[i]
        if storage is None:
            continue
        if i == 1 and case.frozen_weight:
            assert g is None, (what, "a frozen weight got a gradient")
            continue
        assert g is not None, (what, "a gradient came back None", i)
        assert g.dtype == storage.dtype and g.shape == storage.shape, (what, i, g.dtype, g.shape)
        inside = torch.zeros(storage.shape, dtype=torch.bool)
        inp.views[i](inside).fill_(True)
        assert (g[~inside] == 0).all(), (what, "gradient outside the view")
        gv, wv = inp.views[i](g).double(), inp.views[i](want)
        assert torch.isfinite(gv).all(), (what, "non-finite gradient", i)
        err = (gv - wv).abs()
        bad = err > bound
        if bad.any():
            bb = bound[bad].min().item()
            raise AssertionError(f"{what}\ngradient {i}: error {err[bad].max().item():.3g} > bound {bb:.3g}; "
                                 f"got {gv[bad][:4].tolist()} want {wv[bad][:4].tolist()}")
        if not case.op.startswith("linear_"):
            rows = gv.reshape(-1, case.V)
            still = ~inp.valid if kind != "token" else ~inp.counted
            assert (rows[still] == 0).all(), (what, "a position that does not count got a gradient")


def backends_for(inp: Inputs) -> list[str]:
    case = inp.case
    n = int(np.prod(inp.token_shape)) if inp.token_shape else 0
    out = []
    for b in BACKENDS:
        if inp.dtype == torch.float64 and b not in ("torch", "cpu"):
            continue
        if b == "triton" and device_of(b) == "cpu" and (case.V in BIG_V or n * case.V > INTERPRETED_TRITON_MAX):
            continue
        out.append(b)
    return out


# --------------------------------------------------------------------------------------------
# the harness


# make test draws the same BOUNDED_EXAMPLES every run (a gate must not fail by the draw's luck);
# make fuzz draws new ones each time and keeps what fails in hypothesis's database
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("ALIGNOPS_FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=cases())
# --- library bugs the fuzzer found (fixed in alignops/reference/token_stats.py) ---
# the torch backend's fp32 entropy was lse - sum p z: logits ~ +1000 over V = 129920 cancelled to
# 1.6e-4 off float64 (eager fp32: ~1e-5)
@example(case=Case(op="token", layout="padded", dtype="float32", B=1, T=1, V=129920, pattern="shifted_up",
                   entropy=True, seed=0))
# the same on bf16 logits ~ +1000 at T = 0.3, read through strided labels with NaN in ignored rows:
# entropy 8.5e-4 off (the torch backend divided the uncentred logits by T)
@example(case=Case(op="token", layout="shifted", dtype="bfloat16", B=3, T=4, V=11, temperature=0.3,
                   pattern="shifted_up", ignore="some", labels_strided=True, garbage=True, entropy=True,
                   seed=2147483647))
# ... and its backward took x_v / T - x_y / T: GPG's dL/dlogits 8.4e-5 off on logits ~ +1000, T = 0.3
@example(case=Case(op="policy", layout="padded", dtype="float32", B=2, T=3, V=257, temperature=0.3,
                   pattern="shifted_up", ignore="last", ignore_index=-1, mask="ones", method="gpg",
                   options=(("agg", "seq-mean-token-mean"), ("clip_low", 0.3), ("ratio_log_clamp", 0.5)),
                   spread=1.5, token_adv=True, route="inplace_grad", seed=79200))
# CISPO's gradient on logits ~ +1000: 1.3e-5 off where 5.6e-6 was allowed; the torch backend's logp
# error (above) moved CISPO's stop-gradient weight clip(r), which the first bound, differentiating
# the oracle by autograd, did not see (it now differences the objective's coefficients numerically)
@example(case=Case(op="policy", layout="padded", dtype="float32", B=3, T=4, V=1031, temperature=1.3,
                   pattern="shifted_up", ignore="row", garbage=True, method="cispo",
                   options=(("agg", "token-mean"), ("clip_high", 0.5), ("clip_low", 0.1), ("entropy_coef", -0.02),
                            ("normalizer", 3.0), ("ratio_log_clamp", 0.5)), seed=8927))
# after the first of those fixes the torch backend's forward divided by T and its backward multiplied
# by 1/T: log p_v rebuilt from a label with logp ~ -360 missed 0 at the row's max by ulp(360), and
# dlogits was 1e-4 off (fused lm_head, peaked logits, logit_scale 1.7, T = 0.3; cpu and triton exact)
@example(case=Case(op="linear_token", layout="shifted", dtype="float32", B=3, T=5, V=7, H=3, temperature=0.3,
                   pattern="peaked", ignore="last", entropy=True, bias=True, logit_scale=1.7, frozen_weight=True,
                   seed=16604155))
# geo_mean (GMPO) took d = logp - old_logp without ratio_log_clamp: with ratio_log_clamp=0.5 and d = -1 on
# the side the clip does not bound, the loss was -e^-1 instead of -e^-0.5
@example(case=Case(op="policy", layout="padded", dtype="float32", B=1, T=1, V=5, method="geo_mean",
                   options=(("ratio_log_clamp", 0.5),), spread=1.5, seed=13))
# --- the harness's own mistakes, kept so they stay fixed ---
# fp64, peaked (logp ~ -2e-15): the cpu kernel's online sum erred 6 ulp of 1 where eager fp64 matched the
# oracle bit for bit, and the bound was eager's error (0) + 4 eps; the oracle's own fp64 sum error now counts
@example(case=Case(op="linear_sft", layout="padded", dtype="float64", B=1, T=1, V=127, H=1, temperature=1.3,
                   pattern="peaked", options=(("weighting", "none"),), spread=0.7, seed=0))
# packed, rows (0, 2): two rows, two tokens, so [B] advantages are also [N] and the library takes
# them per token (a tensor shaped like the log-probs); the first oracle broadcast them per row
@example(case=Case(op="linear_policy", layout="packed", dtype="float64", B=2, T=2, lengths=(0, 2), V=3, H=16,
                   temperature=2.00001, pattern="large", ignore="some", ignore_index=-1, mask="random",
                   labels_strided=True, method="dr_grpo",
                   options=(("agg", "seq-mean-token-sum-norm"), ("clip_low", 0.3), ("clip_ratio_c", 2.0),
                            ("normalizer", 7.5), ("ratio_log_clamp", None), ("rollout_is_weights", True)),
                   route="grad_in_forward", chunk_size=1, weight_transposed=True, frozen_weight=True, seed=39286))
# an empty view of a non-empty buffer (logits[:, :-1] with T = 0): the bound took max() of nothing
@example(case=Case(op="sequence", layout="shifted", B=1, T=0, V=1, temperature=0.5740891117721587, pattern="peaked",
                   ignore="first", ignore_index=-1, options=(("agg", "mean"), ("return_lengths", False)), seed=3063))
# inplace_grad on logits whose vocabulary is strided is a clear ValueError, not a result to check
@example(case=Case(op="policy", layout="vocab_strided", B=3, T=2, V=13, temperature=1.3, ignore="some",
                   ignore_index=-1, mask="random", labels_strided=True, method="ecpo",
                   options=(("agg", "seq-mean-token-mean"), ("clip_high", 0.2), ("ecpo_delta", 0.1),
                            ("entropy_coef", -0.02), ("normalizer", 0.0), ("ratio_level", "sequence")),
                   spread=0.1, token_adv=True, route="inplace_grad", seed=60983855))
# ... but one token's row has unit stride anyway: no error then
@example(case=Case(op="policy", layout="vocab_strided", B=1, T=1, V=13, route="inplace_grad", seed=5))
# seq-mean-token-sum-norm with an explicit normaliser and no max_len, everything ignored (the oracle
# read max_len before the normaliser replaced it)
@example(case=Case(op="policy", layout="vocab_strided", dtype="bfloat16", B=2, T=2, V=263, temperature=0.5,
                   ignore="all", ignore_index=-1, mask="float", labels_strided=True, method="cispo_scalerl",
                   options=(("agg", "seq-mean-token-sum-norm"), ("entropy_coef", -0.02), ("normalizer", 7.5)),
                   spread=0.1, token_adv=True, seed=1522))
# BAPO's official-code statistic rho is +inf when no token has a negative advantage (all masked here)
@example(case=Case(op="linear_policy", layout="transposed", B=1, T=5, V=257, H=1, temperature=1.3, ignore="all",
                   mask="zeros", labels_strided=True, garbage=True, method="bapo",
                   options=(("bapo_mode", "official_code"), ("entropy_coef", -0.02), ("kl_coef", 0.04),
                            ("kl_estimator", "k2"), ("normalizer", 0.0), ("ratio_log_clamp", None)),
                   token_adv=True, softcap=3.0, logit_scale=0.8, chunk_size=2, weight_transposed=True, seed=33022))
# fp16 lm_head, H = 1: dweight 1.5 fp16 ulps off (dz is rounded to fp16 for the GEMM, as autograd
# does, and the result once more) where eager's largest error happened to be 0.6 ulp: the bound now
# holds those two roundings, not only twice eager's observed error
@example(case=Case(op="linear_sequence", layout="transposed", dtype="float16", B=2, T=3, V=257, H=1, temperature=0.6,
                   pattern="large", ignore="row", ignore_index=-1, options=(("agg", "mean"), ("return_lengths", True)),
                   bias=True, logit_scale=1.7, chunk_size=1, seed=48996))
# fp32 lm_head, V = 129920, H = 1: dhidden 9.7e-5 off where 9.69e-5 was allowed, the error of the fp32
# GEMM summing 129920 products into a result of ~3.4 (the same GEMM of the exact dz errs by as much,
# eager's happened to err less): the bound now holds that accumulation; first as 2 sqrt(n) u |terms|,
# which the next example (logit_scale 1.7: 7.2e-4 off on 7.74, ~4 sqrt(n) u) exceeded, so gamma_n
@example(case=Case(op="linear_token", layout="padded", dtype="float32", B=1, T=1, V=129920, H=1, pattern="large",
                   seed=0))
@example(case=Case(op="linear_token", layout="padded", dtype="float32", B=1, T=1, V=129920, H=1, pattern="large",
                   logit_scale=1.7, seed=0))
# N = 0 with a real vocabulary (a working-tree state of the library briefly returned no gradient
# for an empty input: "a gradient came back None")
@example(case=Case(op="token", layout="padded", B=0, T=0, V=129920, seed=0))
def test_fuzz_logits_surface(case):
    inp = build(case)
    if case.route == "inplace_grad" and inp.views[0](inp.storages[0]).stride(-1) != 1:
        # the gradient cannot be written into logits whose vocabulary is strided: a clear error
        for backend in backends_for(inp):
            with pytest.raises(ValueError, match="inplace_grad=True needs logits with unit stride"):
                run(inp, backend)
        return
    ref = reference(inp)
    results = {}
    for backend in backends_for(inp):
        results[backend] = run(inp, backend)
        check(inp, ref, backend, results[backend])
    # the backends against each other: the same outputs, dtypes, metrics and gradients present,
    # and metrics within what the logp errors allow
    base = results["torch"]
    for backend, got in results.items():
        what = f"{backend} vs torch: {case}"
        assert got[0].keys() == base[0].keys() and got[3] == base[3], what
        assert got[2].keys() == base[2].keys(), (what, sorted(got[2]), sorted(base[2]))
        assert [g is None for g in got[1]] == [g is None for g in base[1]], what
        for name, v in got[2].items():
            # the metrics the oracle has were held to it above; the rest (BAPO's rho) move with
            # the ratios, by at most the logp error relative to the value
            if f"metrics/{name}" in ref.outputs:
                continue
            w = base[2][name].item()
            tol = (1e-5 + 4 * ref.max_lp_err) * max(1.0, abs(w))
            assert v.item() == w or abs(v.item() - w) <= tol, (what, name, v.item(), w)


def test_every_registry_method_is_fuzzed():
    """The harness draws only the methods it has a float64 oracle for: a method added to the
    registry needs one here (in policy_objective, with its defaults in OTHER_DEFAULTS)."""
    missing = sorted(set(method_names()) - set(ORACLE_METHODS))
    assert not missing, f"registry methods without an oracle in tests/test_fuzz.py: {missing}"
