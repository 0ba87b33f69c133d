"""Batch invariance and determinism of the logits ops, as properties, on every backend that runs here
(torch, cpu, and triton: compiled on a GPU, else interpreted on CPU tensors).

A *row* is one position's logits (a row of `[N, V]`, or `(b, t)` of `[B, T, V]`). The property: a
row's outputs and its gradient are BITWISE equal whatever batch holds it: alone (N = 1) or among
other rows (other N, other positions, any neighbours: peaked, shifted by +-1000, -inf, NaN, ignored),
in any layout the op takes (`[N, V]`, a `[B, T, V]` shift view, rows with a padded stride). And two
identical calls are bitwise equal (run-to-run determinism). Bitwise means the bit patterns
(`same_bits`: NaN payloads and the sign of zero included).

What "a row's outputs and gradient" is, per op:
  - token_logprobs: its logp and entropy, and d/dlogits[row] of sum_n(wl_n logp_n + we_n H_n), the
    weights wl, we being the row's own (so the upstream gradient a row sees is the same in every batch).
  - fused_policy_loss, sft_loss: the loss sums over rows, L = sum_rows l(row) / normalizer. With the
    optimiser step's normalizer passed (`normalizer=`, fixed; docs/api.md: the way to make the loss
    invariant to micro-batching) dL/dlogits[row] = dl(row)/dlogits[row] / normalizer depends on the
    row alone, and that gradient is the row's output. A row is a sequence here (packed layout,
    `cu_seqlens`): sequence-level methods (gspo) and aggregations (seq-mean-token-mean) are separable
    by sequence. The loss value itself is a sum over the batch: only its determinism is asserted.
    (With normalizer=None the normaliser is this call's token or row count, so every row's gradient
    changes with the batch, by definition.)
  - sequence_logprobs: a sequence's sum of log-probs and the gradient of sum_s w_s S_s.
  - the fused lm_head (fused_linear_token_logprobs): a row's logp, entropy and dhidden. Its GEMMs
    round each row's dot products in an order that depends on the batch (a BLAS call with one row
    takes another kernel than one with several), so its promise is split in two: with GEMMs that are
    exact (a weight with one power-of-two entry per hidden column: every dot product is one product)
    it is bitwise invariant like the rest, so the chunking, the tiles and the row kernels add no batch
    dependence; with dense weights each row stays within a bound of float64 derived from the GEMMs'
    rounding (test_fused_lm_head_dense_rows_within_the_gemm_rounding_bound). dweight and dbias are
    sums over the rows: only their determinism is asserted.
  - the torch backend's reductions split a row over threads when the call has one row and V >= 32768
    (torch's two-pass reduction): test_single_row_large_vocab.

Vocabularies are primes (1009, 4099 and 40009: a multiple of no tile), the temperature is 0.7, logits
fp32 and bf16. The interpreted triton backend gets few, small examples (it is slow). A failure names
the op, backend, dtype, probe, its position and batch size, and which output moved.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import alignops as ao
from tests.conftest import device_of, fast_backends, make_logits

BACKENDS = ["torch"] + fast_backends()
INTERPRETED = [b for b in BACKENDS if b == "triton" and device_of(b) == "cpu"]
COMPILED = [b for b in BACKENDS if b not in INTERPRETED]
TEMP = 0.7
IGNORE = -100
NORM = 13.0  # the optimiser step's normaliser (fixed, whatever the batch)
LAYOUTS = ("rows", "padded", "shifted")
NEIGHBOURS = ("normal", "peaked", "shifted_up", "shifted_down", "neginf", "nan", "ignored")
# the hypothesis profile's budget (conftest: 25 under ci): the interpreter gets a twelfth of it
N_FAST = max(2, settings.default.max_examples // 2)
N_SLOW = max(1, settings.default.max_examples // 12)
# no shrinking: a failing example is reported as drawn (shrinking the interpreted cases takes minutes)
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
V_DTYPES = [(1009, torch.float32), (1009, torch.bfloat16), (4099, torch.float32), (4099, torch.bfloat16)]
V_DTYPES_SLOW = [(1009, torch.bfloat16), (4099, torch.float32)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN when the bits are the same; +0 != -0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def assert_same_bits(got, want, what):
    if not same_bits(got, want):
        diff = (got.double() - want.double()).abs()
        finite = diff[~diff.isnan()]
        raise AssertionError(f"{what}: not bitwise equal (max |diff| "
                             f"{finite.max().item() if finite.numel() else 'nan'})")


def finite_label(row: torch.Tensor, gen: torch.Generator) -> int:
    ok = torch.isfinite(row).nonzero()[:, 0]
    return int(ok[torch.randint(0, ok.numel(), (1,), generator=gen)])


def neighbour_row(pattern: str, v: int, dtype, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """One neighbour row and its label."""
    base = "normal" if pattern in ("nan", "ignored") else pattern
    x = make_logits(1, v, dtype, base, gen, neginf_frac=0.5)[0]
    if pattern == "nan":
        x[torch.randint(0, v, (1,), generator=gen)] = math.nan
    # a peaked row's label is its peak: p ~ 1 and logp ~ 0, where an ulp is tiny
    label = IGNORE if pattern == "ignored" else int(x.argmax()) if pattern == "peaked" else finite_label(x, gen)
    return x, label


@functools.lru_cache(maxsize=None)
def probe_rows(v: int, dtype: torch.dtype):
    """The rows whose outputs are followed from batch to batch: normal, peaked (logp ~ 0, entropy ~ 0),
    shifted by +1000 (ulps of 6e-5) and -inf over the first tile and more. All but the shifted one are
    labelled at their largest logit, where logp is small and its ulp too (a change of 1e-7 shows)."""
    gen = torch.Generator().manual_seed(v)
    rows, labels = [], []
    for pattern in ("normal", "peaked", "shifted_up", "neginf_first_tile"):
        x = make_logits(1, v, dtype, pattern, gen, first_tile=256)[0]
        rows.append(x)
        labels.append(finite_label(x, gen) if pattern == "shifted_up" else int(x.argmax()))
    k = len(rows)
    return torch.stack(rows), torch.tensor(labels), torch.randn(k, generator=gen), torch.randn(k, generator=gen)


def lay_out(rows: torch.Tensor, layout: str):
    """(buffer, view): the rows [N, V] written into a buffer whose `view` is the op's logits:
    "rows" [N, V]; "padded" [N, V] with row stride V + 5 starting 2 elements in; "shifted" the
    [B, T, V] view buf[:, :-1] of a [B, T + 1, V] buffer (the usual shift)."""
    n, v = rows.shape
    if layout == "rows":
        return rows.clone(), lambda b: b
    if layout == "padded":
        buf = torch.zeros(n, v + 5, dtype=rows.dtype)
        buf[:, 2:v + 2] = rows
        return buf, lambda b: b[:, 2:v + 2]
    bsz = 2 if n % 2 == 0 else 1
    buf = torch.zeros(bsz, n // bsz + 1, v, dtype=rows.dtype)
    buf[:, :-1] = rows.view(bsz, n // bsz, v)
    return buf, lambda b: b[:, :-1]


def token_logprobs_rows(backend, rows, labels, wl, we, layout="rows"):
    """(logp [N], entropy [N], dlogits [N, V]) of token_logprobs on `rows` laid out as `layout`, for
    the loss sum(wl * logp + we * H); on CPU."""
    n, v = rows.shape
    buf, view = lay_out(rows, layout)
    buf = buf.to(device_of(backend)).requires_grad_()
    x = view(buf)
    dev = buf.device
    shape = x.shape[:-1]
    lp, ent = ao.token_logprobs(x, labels.view(shape).to(dev), temperature=TEMP, compute_entropy=True,
                                backend=backend)
    (lp * wl.view(shape).to(dev) + ent * we.view(shape).to(dev)).sum().backward()
    return lp.reshape(n).cpu(), ent.reshape(n).cpu(), view(buf.grad).reshape(n, v).cpu()


@functools.lru_cache(maxsize=None)
def probe_alone(backend, v, dtype):
    """Each probe row's outputs when it is the whole batch (N = 1)."""
    x, y, wl, we = probe_rows(v, dtype)
    return [token_logprobs_rows(backend, x[k:k + 1], y[k:k + 1], wl[k:k + 1], we[k:k + 1]) for k in range(len(y))]


@st.composite
def batches(draw, n_probes: int, max_n: int, n_batches: int = 2, min_n: int = 1):
    """`n_batches` batches, each (slots, layout, seed): slot k >= 0 holds probe k, -1 a neighbour
    (its pattern drawn with it); every batch holds at least one probe, maybe several, maybe one twice."""
    out = []
    for _ in range(n_batches):
        n = draw(st.integers(min_n, max_n))
        slots = draw(st.lists(st.sampled_from([-1] * 2 + list(range(n_probes))), min_size=n, max_size=n))
        if all(s < 0 for s in slots):
            slots[draw(st.integers(0, n - 1))] = draw(st.integers(0, n_probes - 1))
        patterns = draw(st.lists(st.sampled_from(NEIGHBOURS), min_size=n, max_size=n))
        out.append((slots, patterns, draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2 ** 16))))
    return out


def check_token_logprobs(backend, v, dtype, arrangement):
    x, y, wl, we = probe_rows(v, dtype)
    alone = probe_alone(backend, v, dtype)
    for b, (slots, patterns, layout, seed) in enumerate(arrangement):
        gen = torch.Generator().manual_seed(seed)
        rows, labels, w1, w2 = [], [], [], []
        for k, pattern in zip(slots, patterns):
            if k >= 0:
                rows.append(x[k]), labels.append(int(y[k])), w1.append(wl[k]), w2.append(we[k])
            else:
                r, lab = neighbour_row(pattern, v, dtype, gen)
                rows.append(r), labels.append(lab)
                w1.append(torch.randn((), generator=gen)), w2.append(torch.randn((), generator=gen))
        args = (torch.stack(rows), torch.tensor(labels), torch.stack(w1), torch.stack(w2))
        got = token_logprobs_rows(backend, *args, layout=layout)
        for i, k in enumerate(slots):
            if k >= 0:
                for name, g, a in zip(("logp", "entropy", "dlogits"), got, alone[k]):
                    assert_same_bits(g[i], a[0], f"{backend} {dtype} V={v}: probe {k} at {i} of {len(slots)} "
                                                 f"({layout}) {name}")
        if b == 0:  # determinism: the same call again, every output
            again = token_logprobs_rows(backend, *args, layout=layout)
            for name, g, a in zip(("logp", "entropy", "dlogits"), got, again):
                assert_same_bits(g, a, f"{backend} {dtype} V={v}: a second identical call, {name}")


@pytest.mark.parametrize("v,dtype", V_DTYPES, ids=[f"V{v}-{str(d)[6:]}" for v, d in V_DTYPES])
@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=N_FAST, deadline=None, phases=PHASES)
@given(arrangement=batches(n_probes=4, max_n=16))
def test_token_logprobs_row_is_batch_invariant(backend, v, dtype, arrangement):
    """token_logprobs: a row's logp, entropy and dlogits are bitwise those of the row alone, and an
    identical call repeats bitwise."""
    check_token_logprobs(backend, v, dtype, arrangement)


@pytest.mark.parametrize("v,dtype", V_DTYPES_SLOW, ids=[f"V{v}-{str(d)[6:]}" for v, d in V_DTYPES_SLOW])
@pytest.mark.parametrize("backend", INTERPRETED)
@settings(max_examples=N_SLOW, deadline=None, phases=PHASES)
@given(arrangement=batches(n_probes=4, max_n=4, min_n=2))
def test_token_logprobs_row_is_batch_invariant_interpreted(backend, v, dtype, arrangement):
    """The same, for the interpreted triton backend: fewer and smaller batches."""
    check_token_logprobs(backend, v, dtype, arrangement)


# --------------------------------------------------------------------------------------------
# sequences: fused_policy_loss, sequence_logprobs, sft_loss (packed layout, a row is a sequence)

# route: (method, agg, grad_in_forward). grpo with grad_in_forward runs the one-launch kernel on cpu
# and triton (the two-pass kernels on torch); gspo is sequence-level (two-pass everywhere).
ROUTES = {"autograd": ("grpo", "token-mean", False), "terminal": ("grpo", "seq-mean-token-mean", True),
          "sequence": ("gspo", "seq-mean-token-mean", True)}
SEQ_NEIGHBOURS = ("normal", "peaked", "shifted_up", "neginf", "nan", "ignored")


def float64_logp(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = torch.log_softmax(x.double() / TEMP, -1)
    return torch.where(labels != IGNORE, z.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)


def make_sequence(length: int, patterns, v: int, dtype, gen: torch.Generator) -> dict:
    """A sequence's per-token tensors (logits, labels, old_logp, ref_logp) and per-sequence ones
    (advantage, weight). old_logp is the float64 log-prob moved by up to +-0.3, so that ratios fall
    on both sides of both clip bounds."""
    rows, labels = zip(*(neighbour_row(p, v, dtype, gen) for p in patterns[:length]))
    x, y = torch.stack(rows), torch.tensor(labels)
    lp = float64_logp(x, y).float()
    return {"x": x, "y": y, "old": lp + (torch.rand(length, generator=gen) - 0.5) * 0.6,
            "ref": lp + (torch.rand(length, generator=gen) - 0.5) * 0.2,
            "adv": torch.randn((), generator=gen), "w": torch.randn((), generator=gen)}


@functools.lru_cache(maxsize=None)
def probe_sequences(v: int, dtype: torch.dtype) -> tuple:
    """Two sequences followed from batch to batch: 3 tokens (one ignored, one with +1000 logits) and 2."""
    gen = torch.Generator().manual_seed(v + 1)
    return (make_sequence(3, ["normal", "ignored", "shifted_up"], v, dtype, gen),
            make_sequence(2, ["peaked", "neginf"], v, dtype, gen))


@st.composite
def sequence_batches(draw, max_seqs: int, n_batches: int = 2, min_seqs: int = 1):
    """Batches of sequences, each (slots, seed): slot k >= 0 is probe sequence k, else a neighbour
    (length, patterns); at least one probe per batch."""
    out = []
    for _ in range(n_batches):
        n = draw(st.integers(min_seqs, max_seqs))
        slots = []
        for _ in range(n):
            if draw(st.booleans()):
                slots.append(draw(st.integers(0, 1)))
            else:
                length = draw(st.integers(1, 3))
                slots.append(tuple(draw(st.lists(st.sampled_from(SEQ_NEIGHBOURS), min_size=length,
                                                 max_size=length))))
        if not any(isinstance(s, int) for s in slots):
            slots[draw(st.integers(0, n - 1))] = draw(st.integers(0, 1))
        out.append((slots, draw(st.integers(0, 2 ** 16))))
    return out


def build_sequences(slots, seed, v, dtype):
    """The batch's packed tensors and, for each probe occurrence, (probe, first token, sequence index)."""
    gen = torch.Generator().manual_seed(seed)
    probes = probe_sequences(v, dtype)
    seqs, where, start = [], [], 0
    for i, s in enumerate(slots):
        seq = probes[s] if isinstance(s, int) else make_sequence(len(s), s, v, dtype, gen)
        if isinstance(s, int):
            where.append((s, start, i))
        seqs.append(seq)
        start += seq["y"].numel()
    cat = {k: torch.cat([s[k] for s in seqs]) for k in ("x", "y", "old", "ref")}
    per_seq = {k: torch.stack([s[k] for s in seqs]) for k in ("adv", "w")}
    cu = torch.tensor([0] + [s["y"].numel() for s in seqs]).cumsum(0)
    return {**cat, **per_seq, "cu": cu}, where


def policy_outputs(backend, route, b):
    """(loss, dlogits [N, V]) of fused_policy_loss by `route` on the packed batch `b`, on CPU."""
    method, agg, grad_in_forward = ROUTES[route]
    dev = device_of(backend)
    x = b["x"].to(dev, copy=True).requires_grad_()
    out = ao.fused_policy_loss(x, b["y"].to(dev), b["old"].to(dev), b["adv"].to(dev), cu_seqlens=b["cu"].to(dev),
                               method=method, agg=agg, normalizer=NORM, temperature=TEMP, ref_logp=b["ref"].to(dev),
                               kl_coef=0.05, entropy_coef=0.01, grad_in_forward=grad_in_forward, backend=backend)
    out.loss.backward()
    return out.loss.detach().cpu(), x.grad.cpu()


def sequence_outputs(backend, b):
    """sequence_logprobs (S, d/dlogits of sum w S) and sft_loss (dft weighting, normaliser fixed:
    loss, d/dlogits) on the packed batch `b`, on CPU."""
    dev = device_of(backend)
    x = b["x"].to(dev, copy=True).requires_grad_()
    y, cu = b["y"].to(dev), b["cu"].to(dev)
    s = ao.sequence_logprobs(x, y, cu_seqlens=cu, temperature=TEMP, backend=backend)
    (s * b["w"].to(dev)).sum().backward()
    g_seq, x.grad = x.grad.cpu(), None
    sft = ao.sft_loss(x, y, cu_seqlens=cu, weighting="dft", normalizer=NORM, temperature=TEMP, backend=backend)
    sft.loss.backward()
    return s.detach().cpu(), g_seq, sft.loss.detach().cpu(), x.grad.cpu()


def check_sequences(backend, v, dtype, arrangement, routes):
    """Every probe sequence's outputs in every batch bitwise equal to those of the probe alone, and
    a second identical call bitwise equal to the first."""
    alone = {}
    for k in range(2):
        b, _ = build_sequences([k], 0, v, dtype)
        alone[k] = ({r: policy_outputs(backend, r, b) for r in routes}, sequence_outputs(backend, b))
    for n_batch, (slots, seed) in enumerate(arrangement):
        b, where = build_sequences(slots, seed, v, dtype)
        got = {r: policy_outputs(backend, r, b) for r in routes}
        seq = sequence_outputs(backend, b)
        for k, t0, i in where:
            rows = slice(t0, t0 + probe_sequences(v, dtype)[k]["y"].numel())
            what = f"{backend} {dtype} V={v}: probe sequence {k} at sequence {i} of {len(slots)}"
            for r in routes:
                assert_same_bits(got[r][1][rows], alone[k][0][r][1], f"{what}, fused_policy_loss ({r}) dlogits")
            assert_same_bits(seq[0][i], alone[k][1][0][0], f"{what}, sequence_logprobs")
            assert_same_bits(seq[1][rows], alone[k][1][1], f"{what}, sequence_logprobs dlogits")
            assert_same_bits(seq[3][rows], alone[k][1][3], f"{what}, sft_loss dlogits")
        if n_batch == 0:
            for r in routes:
                for g, a, name in zip(got[r], policy_outputs(backend, r, b), ("loss", "dlogits")):
                    assert_same_bits(g, a, f"{backend} {dtype}: fused_policy_loss ({r}) {name}, "
                                           "a second identical call")
            for g, a, name in zip(seq, sequence_outputs(backend, b), ("S", "dS", "sft loss", "sft dlogits")):
                assert_same_bits(g, a, f"{backend} {dtype}: {name}, a second identical call")


@pytest.mark.parametrize("v,dtype", [(1009, torch.bfloat16), (4099, torch.float32)], ids=["V1009-bf16", "V4099-f32"])
@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=N_FAST // 2, deadline=None, phases=PHASES)
@given(arrangement=sequence_batches(max_seqs=5))
def test_sequence_ops_row_is_batch_invariant(backend, v, dtype, arrangement):
    """fused_policy_loss (autograd, one-launch or two-pass terminal, sequence-level gspo) with the
    step's normaliser fixed, sequence_logprobs and sft_loss: a sequence's gradient (and S) is bitwise
    that of the sequence alone; identical calls repeat bitwise, the losses included."""
    check_sequences(backend, v, dtype, arrangement, tuple(ROUTES))


@pytest.mark.parametrize("backend", INTERPRETED)
@settings(max_examples=N_SLOW, deadline=None, phases=PHASES)
@given(arrangement=sequence_batches(max_seqs=2, n_batches=1, min_seqs=2))
def test_sequence_ops_row_is_batch_invariant_interpreted(backend, arrangement):
    """The same on the interpreted triton backend (the two token-local routes: autograd and the
    one-launch kernel; V = 1009, bf16)."""
    check_sequences(backend, 1009, torch.bfloat16, arrangement, ("autograd", "terminal"))


# --------------------------------------------------------------------------------------------
# the fused lm_head: hidden states x the lm_head weight

H_DIM = 16
LM_NEIGHBOURS = ("normal", "large", "nan", "ignored")


def lm_head_outputs(backend, h, w, y, wl, we, bias=None, chunk=None):
    """(logp, entropy, dhidden, dweight, dbias) of fused_linear_token_logprobs for the loss
    sum(wl * logp + we * H), on CPU."""
    dev = device_of(backend)
    leaves = [None if t is None else t.to(dev, copy=True).requires_grad_() for t in (h, w, bias)]
    lp, ent = ao.fused_linear_token_logprobs(leaves[0], leaves[1], y.to(dev), bias=leaves[2], temperature=TEMP,
                                             compute_entropy=True, chunk_size=chunk, backend=backend)
    (lp * wl.to(dev) + ent * we.to(dev)).sum().backward()
    return (lp.detach().cpu(), ent.detach().cpu(), *[None if t is None else t.grad.cpu() for t in leaves])


@functools.lru_cache(maxsize=None)
def exact_head(v: int, dtype: torch.dtype):
    """A weight whose GEMMs are exact in any order, a bias, and three probe rows (hidden, label, wl, we).

    Each hidden column k has one nonzero weight, +-1/2, +-1 or +-2, in its own vocabulary row r(k):
    logit v is bias_v, plus h_k w_{v,k} where v = r(k); dhidden_k = g_{r(k)} w_{r(k),k}. Every dot
    product of the logits GEMM and of the dhidden GEMM is then one product by a power of two (exact,
    the rest adds zeros), and the bias add rounds once: nothing depends on the order of a sum. The
    labels are rows that carry a weight, so the label's logit moves with the hidden state; the second
    probe is ten times larger (peaked)."""
    gen = torch.Generator().manual_seed(v + 2)
    w = torch.zeros(v, H_DIM, dtype=torch.float64)
    rows = torch.randperm(v, generator=gen)[:H_DIM]
    sign = torch.randint(0, 2, (H_DIM,), generator=gen) * 2 - 1
    scale = 2.0 ** torch.randint(-1, 2, (H_DIM,), generator=gen) * sign
    w[rows, torch.arange(H_DIM)] = scale.double()
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 2
    h = torch.randn(3, H_DIM, generator=gen, dtype=torch.float64) * 3
    h[1] *= 10
    y = rows[(h * scale.double()).argmax(1)]  # the weighted logit h_k w_k that is largest: logp is small
    return (w.to(dtype), bias.to(dtype), h.to(dtype), y, torch.randn(3, generator=gen), torch.randn(3, generator=gen))


@st.composite
def head_batches(draw, max_n: int, n_batches: int = 2, min_n: int = 1):
    out = []
    for _ in range(n_batches):
        n = draw(st.integers(min_n, max_n))
        slots = draw(st.lists(st.sampled_from([-1, -1, 0, 1, 2]), min_size=n, max_size=n))
        if all(s < 0 for s in slots):
            slots[draw(st.integers(0, n - 1))] = draw(st.integers(0, 2))
        patterns = draw(st.lists(st.sampled_from(LM_NEIGHBOURS), min_size=n, max_size=n))
        out.append((slots, patterns, draw(st.sampled_from([None, 1, 2, 3])), draw(st.integers(0, 2 ** 16))))
    return out


def check_exact_head(backend, v, dtype, arrangement):
    w, bias, h, y, wl, we = exact_head(v, dtype)
    alone = [lm_head_outputs(backend, h[k:k + 1], w, y[k:k + 1], wl[k:k + 1], we[k:k + 1], bias) for k in range(3)]
    for n_batch, (slots, patterns, chunk, seed) in enumerate(arrangement):
        gen = torch.Generator().manual_seed(seed)
        hs, ys, w1, w2 = [], [], [], []
        for k, pattern in zip(slots, patterns):
            if k >= 0:
                hs.append(h[k]), ys.append(int(y[k])), w1.append(wl[k]), w2.append(we[k])
                continue
            row = torch.randn(H_DIM, generator=gen, dtype=torch.float64) * (30 if pattern == "large" else 3)
            if pattern == "nan":
                row[torch.randint(0, H_DIM, (1,), generator=gen)] = math.nan
            hs.append(row.to(dtype))
            ys.append(IGNORE if pattern == "ignored" else int(torch.randint(0, v, (1,), generator=gen)))
            w1.append(torch.randn((), generator=gen)), w2.append(torch.randn((), generator=gen))
        args = (torch.stack(hs), w, torch.tensor(ys), torch.stack(w1), torch.stack(w2), bias, chunk)
        got = lm_head_outputs(backend, *args)
        for i, k in enumerate(slots):
            if k >= 0:
                for name, g, a in zip(("logp", "entropy", "dhidden"), got, alone[k]):
                    assert_same_bits(g[i], a[0], f"{backend} {dtype} V={v}: probe {k} at {i} of {len(slots)} "
                                                 f"(chunk_size={chunk}) {name}")
        if n_batch == 0:
            again = lm_head_outputs(backend, *args)
            for name, g, a in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), got, again):
                assert_same_bits(g, a, f"{backend} {dtype} V={v}: {name}, a second identical call")


@pytest.mark.parametrize("v,dtype", [(1009, torch.float32), (4099, torch.bfloat16)], ids=["V1009-f32", "V4099-bf16"])
@pytest.mark.parametrize("backend", COMPILED)
@settings(max_examples=N_FAST // 2, deadline=None, phases=PHASES)
@given(arrangement=head_batches(max_n=12))
def test_fused_lm_head_bitwise_when_the_gemms_are_exact(backend, v, dtype, arrangement):
    """With GEMMs that are exact whatever their order (exact_head), a row's logp, entropy and dhidden
    are bitwise those of the row alone, for any chunk_size: the chunking, the tiles and the row
    kernels add no batch dependence of their own. Identical calls repeat bitwise, dweight and dbias
    included."""
    check_exact_head(backend, v, dtype, arrangement)


@pytest.mark.parametrize("backend", INTERPRETED)
@settings(max_examples=N_SLOW, deadline=None, phases=PHASES)
@given(arrangement=head_batches(max_n=3, n_batches=1, min_n=2))
def test_fused_lm_head_bitwise_when_the_gemms_are_exact_interpreted(backend, arrangement):
    check_exact_head(backend, 1009, torch.float32, arrangement)


U32, U16 = 2.0 ** -24, 2.0 ** -8  # unit roundoff of fp32 and bf16 (round to nearest)
LAMBDA = 8.0  # probabilistic bound: fails with probability below 2 n exp(-LAMBDA^2 / 2) ~ 1e-10 n per sum


def gamma(n: int) -> float:
    """The worst-case relative bound of a sum of n products in fp32, whatever the order (Higham, Accuracy
    and Stability of Numerical Algorithms, 3.1): n u / (1 - n u)."""
    return n * U32 / (1 - n * U32)


def gamma_probabilistic(n: int) -> float:
    """Higham & Mary (SIAM J. Sci. Comput. 41, 2019), Theorem 3.1: with rounding errors modelled as
    independent and of mean zero, a sum of n products lies within exp(LAMBDA sqrt(n) u + n u^2/(1-u)) - 1
    of the exact one relative to sum |x_i y_i|, except with probability at most 2 n exp(-LAMBDA^2 (1-u)^2 / 2)."""
    return math.expm1(LAMBDA * math.sqrt(n) * U32 + n * U32 ** 2 / (1 - U32))


def dense_head_bounds(backend, h, w, y, wl, we):
    """Float64 references and per-row bounds (logp [P], entropy [P], dhidden [P, H]) for the fused lm_head
    on dense weights. A row's logits are the GEMM's: each within delta_v = gamma(H) sum_k |h_k w_vk| of
    the exact z_v, in any summation order. To first order that moves
        logp by at most  (delta_y + sum_v p_v delta_v) / T
        H    by at most  sum_v p_v |log p_v + H| delta_v / T
        g_v = dL/dz_v = (a (1[v=y] - p_v) - b p_v (log p_v + H)) / T through p_v, log p_v and H,
    and dhidden = g @ W adds the dhidden GEMM's rounding over the vocabulary (probabilistic bound:
    gamma_probabilistic(V) sum_v |g_v w_vk|), for bf16 the rounding of g to bf16 before it and of
    dhidden after it (u = 2^-8 each). The row kernels' own rounding is measured: the same backend's
    token_logprobs on the correctly rounded logits fl32(h @ W.T), against float64 (dhidden through an
    exact GEMM); it is allowed twice, as the logits the kernels get differ in the last bits."""
    dtype = h.dtype
    h64, w64 = h.double(), w.double()
    x64 = h64.clone().requires_grad_()
    z = (x64 @ w64.t()) / TEMP
    log_p = torch.log_softmax(z, -1)
    lp = log_p.gather(1, y[:, None])[:, 0]
    ent = -(log_p.exp() * log_p).sum(-1)
    (lp * wl.double() + ent * we.double()).sum().backward()
    ref = (lp.detach(), ent.detach(), x64.grad)
    log_p, ent_d = log_p.detach(), ent.detach()[:, None]
    p = log_p.exp()
    delta = gamma(h.shape[1]) * (h64.abs() @ w64.abs().t())
    c = (log_p + ent_d).abs()
    g_lp = (delta.gather(1, y[:, None])[:, 0] + (p * delta).sum(-1)) / TEMP
    g_ent = (p * c * delta).sum(-1) / TEMP
    # the row kernels on the correctly rounded logits
    dev = device_of(backend)
    zs = (h64 @ w64.t()).float().to(dev).requires_grad_()
    lps, ents = ao.token_logprobs(zs, y.to(dev), temperature=TEMP, compute_entropy=True, backend=backend)
    (lps * wl.to(dev) + ents * we.to(dev)).sum().backward()
    e_lp, e_ent = (lps.detach().cpu().double() - ref[0]).abs(), (ents.detach().cpu().double() - ref[1]).abs()
    e_dh = (zs.grad.cpu().double() @ w64 - ref[2]).abs()
    # dhidden
    a, b = wl.double()[:, None].abs(), we.double()[:, None].abs()
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    g = (wl.double()[:, None] * (onehot - p) - we.double()[:, None] * p * (log_p + ent_d)) / TEMP
    d = delta + (p * delta).sum(-1, keepdim=True)
    dp, dlog_p = p * d / TEMP, d / TEMP
    dg = (a * dp + b * (dp * c + p * (dlog_p + g_ent[:, None]))) / TEMP
    g_abs = g.abs() + dg
    u_in = U16 if dtype == torch.bfloat16 else 0.0
    dh_abs = ref[2].abs()
    g_dh = dg @ w64.abs() + (u_in + gamma_probabilistic(w.shape[0]) * (1 + u_in)) * (g_abs @ w64.abs())
    g_dh = g_dh + u_in * (dh_abs + g_dh + 2 * e_dh)
    bounds = (g_lp + 2 * e_lp, g_ent + 2 * e_ent, g_dh + 2 * e_dh)
    return ref, bounds


@functools.lru_cache(maxsize=None)
def dense_head(v: int, dtype: torch.dtype, pool: int = 12):
    gen = torch.Generator().manual_seed(v + 3)
    h = torch.randn(pool, H_DIM, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, H_DIM, generator=gen, dtype=torch.float64) / H_DIM ** 0.5 * 2).to(dtype)
    y = torch.randint(0, v, (pool,), generator=gen)
    return h, w, y, torch.randn(pool, generator=gen), torch.randn(pool, generator=gen)


def check_dense_head(backend, v, dtype, placements):
    h, w, y, wl, we = dense_head(v, dtype)
    ref, bounds = dense_head_bounds(backend, h, w, y, wl, we)
    worst = [0.0, 0.0, 0.0]
    for rows, chunk in placements:
        got = lm_head_outputs(backend, h[rows], w, y[rows], wl[rows], we[rows], chunk=chunk)
        for q, name in enumerate(("logp", "entropy", "dhidden")):
            err = (got[q].double() - ref[q][rows]).abs()
            ratio = (err / bounds[q][rows]).max().item()
            worst[q] = max(worst[q], ratio)
            assert ratio <= 1.0, (f"{backend} {dtype} V={v}: rows {rows} (chunk_size={chunk}) {name}: error "
                                  f"{err.max().item():.3g} exceeds its bound by {ratio:.3g}x")
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_lm_head_dense_rows_within_the_gemm_rounding_bound(backend, dtype):
    """Dense weights: the GEMMs round a row's dot products in a batch-dependent order (a BLAS call of
    one row takes another path than one of several; on this machine's CPU a row's fp32 logits move by
    a few ulps between them). Every row, alone, in the whole pool, in another order, and in chunks of
    1, 3 and 5 rows, stays within its bound of float64 (dense_head_bounds): logp, entropy and dhidden.
    H = 16, so the worst-case bound of the logits GEMM is within a few times of what it rounds."""
    v = 1009
    pool = list(range(12))
    placements = [([k], None) for k in (0, 5)] + [(pool, None), (pool[::-1], None), (pool, 3), (pool, 1),
                                                  ([5, 0, 7, 2, 9], 5)]
    if backend in INTERPRETED:
        placements = [([0], None), ([3, 0, 1], None), ([3, 0, 1], 1)]
    check_dense_head(backend, v, dtype, placements)


# --------------------------------------------------------------------------------------------
# one row of a large vocabulary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
def test_single_row_large_vocab(backend, dtype):
    """V = 40009 (prime, above torch's 32768-element grain): among batches of 2 or more rows a row's
    outputs are bitwise equal on both backends. Alone, the cpu backend's row is bitwise the same;
    the torch backend's (eager torch ops) may not be: torch reduces a call with a single output over
    threads (its two-pass reduction), another order for the row's sums (measured here: the entropy
    and the gradient move by about one ulp). That row is held to twice the largest error, against
    float64, of the same backend on the 8 rows of a batched call: a sum in another order is as
    accurate, not more."""
    v = 40009
    gen = torch.Generator().manual_seed(7)
    x = make_logits(8, v, dtype, "normal", gen)
    x[3] += 1000  # ulps of 6e-5
    y, wl, we = torch.randint(0, v, (8,), generator=gen), torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    batched = token_logprobs_rows(backend, x, y, wl, we)
    perm = [5, 3, 0, 7]
    other = token_logprobs_rows(backend, x[perm], y[perm], wl[perm], we[perm], layout="shifted")
    for i, r in enumerate(perm):
        for name, a, b in zip(("logp", "entropy", "dlogits"), other, batched):
            assert_same_bits(a[i], b[r], f"{backend} {dtype}: row {r} in two batches, {name}")
    z = x.double().requires_grad_()
    log_p = torch.log_softmax(z / TEMP, -1)
    lp, ent = log_p.gather(1, y[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    (lp * wl.double() + ent * we.double()).sum().backward()
    ref = (lp.detach(), ent.detach(), z.grad)
    worst = [(b.double() - r).abs().max().item() for b, r in zip(batched, ref)]
    for r in (0, 3):
        alone = token_logprobs_rows(backend, x[r:r + 1], y[r:r + 1], wl[r:r + 1], we[r:r + 1])
        for q, name in enumerate(("logp", "entropy", "dlogits")):
            if backend == "cpu":
                assert_same_bits(alone[q][0], batched[q][r], f"cpu {dtype}: row {r} alone, {name}")
            err = (alone[q][0].double() - ref[q][r]).abs().max().item()
            assert err <= 2 * worst[q], \
                f"{backend} {dtype}: row {r} alone, {name}: error {err:.3g} > 2 x {worst[q]:.3g}"
