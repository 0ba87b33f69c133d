"""Distillation losses (alignops/distill.py, docs/distillation.md): distill_loss and
fused_linear_distill_loss against a float64 oracle written from the definitions (log_softmax in
float64 on the same rounded inputs, the divergence summed over the vocabulary, autograd for the
gradient), on every backend that runs here.

Tolerances. Losses: 2e-5 x max(1, |want|) (fp32 accumulation of up to 151936 terms); float64
kernels 1e-12. Gradients: per element, the error model of `grad_bound` (a few ulps of each
log-prob carried through p_s and p_t, plus the final rounding to the logits' dtype).
"""

import math
import zlib

import pytest
import torch

import alignops as ao
from tests.conftest import device_of, fast_backends, make_logits

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]
BACKENDS = ["torch"] + fast_backends()


def oracle(student, teacher, divergence, beta, temperature, valid):
    """Per-token divergence in float64 from the definitions (TRL's generalized JSD: beta = 0 is
    KL(p_t || p_s), beta = 1 is KL(p_s || p_t))."""
    rows = valid.unsqueeze(-1)  # rows that do not count may hold anything (NaN): not used
    ls = torch.log_softmax(torch.where(rows, student.double(), 0.0) / temperature, -1)
    lt = torch.log_softmax(torch.where(rows, teacher.double(), 0.0) / temperature, -1)
    ps, pt = ls.exp(), lt.exp()

    def kl(p, lp, lq):  # sum p (log p - log q), 0 log 0 = 0 (-inf taken out before the product)
        live = p > 0
        return (p * (torch.where(live, lp, 0.0) - torch.where(live, lq, 0.0))).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        d = kl(pt, lt, ls)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        d = kl(ps, ls, lt)
    else:
        m = beta * pt + (1 - beta) * ps
        lm = torch.log(torch.where(m > 0, m, 1.0))  # m = 0 only where both p are 0: unused there
        d = beta * kl(pt, lt, lm) + (1 - beta) * kl(ps, ls, lm)
    return torch.where(valid, d, torch.zeros_like(d))


def check_close(got, want, atol_scale, what):
    got, want = got.double().cpu(), want.double().cpu()
    tol = atol_scale * max(1.0, float(want.abs().max())) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= tol, f"{what}: max |error| {err:.3e} > {tol:.3e}"


def grad_bound(student, teacher, divergence, beta, temperature, valid, agg, dtype):
    """Per element, what rounding alone allows: the kernels hold log-probs to ~K ulps of
    1 + |log p| (a difference of logits, a log of the normaliser), and the gradient
    w (p_s (h - dot) or p_s - p_t) / T inherits that through p_s and p_t; plus one rounding of the
    result to the logits' dtype (and its smallest normal: subnormals may flush to 0, as GPUs do, and a
    peaked row's gradient ~1e-26 is 0 in fp16). K = 16; float64 kernels: fp64 ulps."""
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    rows = valid.unsqueeze(-1)
    ls = torch.log_softmax(torch.where(rows, student.double(), 0.0) / temperature, -1)
    lt = torch.log_softmax(torch.where(rows, teacher.double(), 0.0) / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    fin = lambda x: torch.where(torch.isfinite(x), x, 0.0)  # noqa: E731 - p = 0 there
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        h = fin(ls - lt)
    elif divergence == "jsd" and beta > 0.0:
        h = (1 - beta) * fin(ls - torch.log(beta * pt + (1 - beta) * ps))
    else:
        h = torch.zeros_like(ls)
    dot = (ps * h).sum(-1, keepdim=True)
    w = valid.double() / (valid.sum().clamp_min(1) if agg == "token-mean" else 1)
    g = w.unsqueeze(-1) / temperature * (ps * (h - dot) if h.any() else ps - pt)
    spread = ps * (1 + fin(ls).abs() + h.abs() + dot.abs()) + pt * (1 + fin(lt).abs())
    bound = 16 * acc_eps * w.unsqueeze(-1) / temperature * spread
    out = torch.finfo(dtype)
    return bound + out.eps * g.abs() + out.tiny


def run_case(backend, dtype, divergence, beta, student, teacher, labels=None, mask=None, temperature=1.0,
             agg="token-mean"):
    device = device_of(backend) if backend != "torch" else "cpu"
    s = student.to(dtype=dtype, device=device).requires_grad_()
    t = teacher.to(dtype=dtype, device=device)
    lab = None if labels is None else labels.to(device)
    msk = None if mask is None else mask.to(device)
    out = ao.distill_loss(s, t, lab, divergence=divergence, beta=beta, temperature=temperature, mask=msk, agg=agg,
                          backend=backend)
    out.loss.backward()

    s64 = s.detach().double().cpu().requires_grad_()
    valid = torch.ones(s64.shape[:-1], dtype=torch.bool)
    if labels is not None:
        valid &= labels != -100
    if mask is not None:
        valid &= mask.bool()
    per_token = oracle(s64, t.detach().cpu(), divergence, beta, temperature, valid)
    loss = per_token.sum() / (valid.sum().clamp_min(1) if agg == "token-mean" else 1)
    loss.backward()
    loss_tol = 1e-12 if dtype == torch.float64 else 2e-5
    check_close(out.losses, per_token, loss_tol, "per-token divergence")
    check_close(out.loss, loss, loss_tol, "loss")
    bound = grad_bound(s64.detach(), t.detach().cpu(), divergence, beta, temperature, valid, agg, dtype)
    excess = float(((s.grad.double().cpu() - s64.grad).abs() - bound).max())
    assert excess <= 0, f"gradient: an element exceeds its error bound by {excess:.3e}"
    assert torch.isfinite(s.grad).all()
    return out


# logits near +1000 only in fp32: 16 bits cannot hold them to a useful precision
DTYPE_PATTERNS = [(dt, p) for dt in (torch.float32, torch.bfloat16, torch.float16)
                  for p in ("normal", "peaked", "shifted_up") if p != "shifted_up" or dt == torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,pattern", DTYPE_PATTERNS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_matches_float64(backend, dtype, divergence, beta, pattern):
    g = torch.Generator().manual_seed(zlib.crc32(repr((divergence, beta, pattern)).encode()))
    V = 1031  # prime: no tile divides it
    student = make_logits(6, V, torch.float64, pattern, g).view(2, 3, V)
    teacher = student + make_logits(6, V, torch.float64, "normal", g).view(2, 3, V)
    labels = torch.randint(0, V, (2, 3), generator=g)
    labels[1, 0] = -100  # an ignored position, mask=None
    run_case(backend, dtype, divergence, beta, student, teacher, labels, temperature=0.7)


LARGE_VOCAB = [(b, d, beta) for b in BACKENDS for d, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)]
               if b != "triton" or device_of(b) == "cuda" or d == "jsd"]  # interpreted triton: ~10 s a case


@pytest.mark.parametrize("backend,divergence,beta", LARGE_VOCAB)
def test_large_vocabulary(backend, divergence, beta):
    """Qwen's V = 151936 (a multiple of no power-of-two tile above 128), bf16 and fp32, temperature 1.5."""
    g = torch.Generator().manual_seed(7)
    V = 151936
    rows = 1 if backend == "triton" and device_of(backend) == "cpu" else 2
    student = make_logits(rows, V, torch.float64, "normal", g) * 2
    teacher = make_logits(rows, V, torch.float64, "peaked", g)
    run_case(backend, torch.bfloat16, divergence, beta, student, teacher, temperature=1.5)
    run_case(backend, torch.float32, divergence, beta, student, teacher, temperature=1.5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_float64_kernels(backend, divergence, beta):
    g = torch.Generator().manual_seed(3)
    student = make_logits(5, 67, torch.float64, "normal", g)
    teacher = make_logits(5, 67, torch.float64, "peaked", g)
    run_case(backend, torch.float64, divergence, beta, student, teacher, temperature=1.3)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_gradcheck(backend, divergence, beta):
    """The kernels' backward against finite differences of their own forward, in float64."""
    g = torch.Generator().manual_seed(11)
    s = make_logits(3, 13, torch.float64, "normal", g).requires_grad_()
    t = make_logits(3, 13, torch.float64, "normal", g)
    labels = torch.tensor([1, -100, 4])
    fn = lambda x: ao.distill_loss(x, t, labels, divergence=divergence, beta=beta, temperature=0.9,  # noqa: E731
                                   backend=backend).loss
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neginf_logits_shared(backend):
    """-inf logits where both models put them (a banned token): p = 0 on both sides, every term 0,
    finite loss and gradient (0 at those columns)."""
    g = torch.Generator().manual_seed(5)
    V = 300
    s = make_logits(4, V, torch.float64, "normal", g)
    t = make_logits(4, V, torch.float64, "normal", g)
    banned = torch.rand(4, V, generator=g) < 0.3
    s[banned] = -math.inf
    t[banned] = -math.inf
    for divergence, beta in DIVERGENCES:
        run_case(backend, torch.float32, divergence, beta, s, t, temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_and_empty(backend):
    g = torch.Generator().manual_seed(9)
    V = 97
    s = make_logits(6, V, torch.float64, "normal", g).view(2, 3, V)
    t = make_logits(6, V, torch.float64, "normal", g).view(2, 3, V)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    run_case(backend, torch.float32, "reverse_kl", 0.5, s, t, mask=mask)
    run_case(backend, torch.float32, "jsd", 0.5, s, t, mask=mask.long(), agg="sum")
    # nothing counts: loss 0 and a zero gradient, finite
    out = run_case(backend, torch.float32, "forward_kl", 0.5, s, t, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert float(out.loss) == 0.0
    # ignored rows may hold anything (NaN): not read
    s_nan = s.clone()
    s_nan[0, 1] = math.nan
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[0, 1] = -100
    run_case(backend, torch.float32, "jsd", 0.5, s_nan, t, labels=labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4)])
def test_fused_linear_matches_float64(backend, dtype, divergence, beta):
    """From hidden states: the student's hidden, weight and bias gradients against autograd through
    float64 logits built from the same rounded operands; the teacher's H differs from the student's;
    37 rows in chunks of 16 (a partial last chunk); one ignored label."""
    g = torch.Generator().manual_seed(13)
    device = device_of(backend) if backend != "torch" else "cpu"
    N, H, Ht, V = 37, 32, 48, 1031
    hs = torch.randn(N, H, generator=g).to(dtype)
    ws = (torch.randn(V, H, generator=g) / 6).to(dtype)
    bs = torch.randn(V, generator=g).to(dtype)
    ht = torch.randn(N, Ht, generator=g).to(dtype)
    wt = (torch.randn(V, Ht, generator=g) / 6).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[5] = -100
    ins = [x.to(device).requires_grad_() for x in (hs, ws, bs)]
    wt_dev = wt.to(device).requires_grad_()
    out = ao.fused_linear_distill_loss(ins[0], ins[1], ht.to(device), wt_dev, labels.to(device), student_bias=ins[2],
                                       divergence=divergence, beta=beta, temperature=1.5, chunk_size=16,
                                       backend=backend)
    out.loss.backward()
    assert wt_dev.grad is None  # the teacher gets no gradient

    ref = [x.detach().double().requires_grad_() for x in (hs, ws, bs)]
    valid = labels != -100
    per_token = oracle(ref[0] @ ref[1].T + ref[2], ht.double() @ wt.double().T, divergence, beta, 1.5, valid)
    loss = per_token.sum() / valid.sum()
    loss.backward()
    check_close(out.loss, loss, 2e-5, "loss")
    check_close(out.losses, per_token.detach(), 2e-5, "per-token divergence")
    tol = 2e-4 if dtype == torch.float32 else 1e-2  # fp32 GEMM sums of 32 terms; bf16 results
    for name, x, r in zip(("dhidden", "dweight", "dbias"), ins, ref):
        scale = float(r.grad.abs().max())
        err = float((x.grad.double().cpu() - r.grad).abs().max())
        assert err <= tol * scale, f"{name}: max |error| {err:.3e}, largest {scale:.3e}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
def test_fused_linear_softcap_and_scale(backend):
    """Gemma-style heads: z = c tanh(s (h W^T) / c) for each model with its own c and s, against
    autograd through the float64 transform."""
    g = torch.Generator().manual_seed(17)
    N, H, V = 21, 16, 131
    hs, ws = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ht, wt = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ins = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    out = ao.fused_linear_distill_loss(ins[0], ins[1], ht, wt, softcap=5.0, logit_scale=0.7, teacher_softcap=8.0,
                                       teacher_logit_scale=1.3, divergence="jsd", beta=0.3, chunk_size=8,
                                       backend=backend)
    out.loss.backward()
    ref = [x.double().requires_grad_() for x in (hs, ws)]
    zs = 5.0 * torch.tanh(0.7 * (ref[0] @ ref[1].T) / 5.0)
    zt = 8.0 * torch.tanh(1.3 * (ht.double() @ wt.double().T) / 8.0)
    valid = torch.ones(N, dtype=torch.bool)
    loss = oracle(zs, zt, "jsd", 0.3, 1.0, valid).mean()
    loss.backward()
    check_close(out.loss, loss, 2e-5, "loss")
    for name, x, r in zip(("dhidden", "dweight"), ins, ref):
        err = float((x.grad.double() - r.grad).abs().max())
        assert err <= 2e-4 * float(r.grad.abs().max()), f"{name}: {err:.3e}"


def test_fused_linear_grad_output_scales():
    """The gradients taken in forward are scaled by the incoming gradient (loss * 3)."""
    g = torch.Generator().manual_seed(2)
    hs, ws = torch.randn(9, 8, generator=g), torch.randn(31, 8, generator=g)
    ht, wt = torch.randn(9, 8, generator=g), torch.randn(31, 8, generator=g)
    grads = []
    for k in (1.0, 3.0):
        h = hs.clone().requires_grad_()
        (ao.fused_linear_distill_loss(h, ws, ht, wt, backend="torch").loss * k).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], 3 * grads[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("call,match", [
    (lambda s, t: ao.distill_loss(s, t, divergence="kl"), "divergence"),
    (lambda s, t: ao.distill_loss(s, t, divergence="jsd", beta=1.5), "beta"),
    (lambda s, t: ao.distill_loss(s, t, temperature=0.0), "temperature"),
    (lambda s, t: ao.distill_loss(s, t[:, :-1]), "teacher_logits"),
    (lambda s, t: ao.distill_loss(s, t.double()), "teacher_logits"),
    (lambda s, t: ao.distill_loss(s, t, torch.zeros(4)), "labels"),
    (lambda s, t: ao.distill_loss(s, t, torch.zeros(3, dtype=torch.long)), "labels"),
    (lambda s, t: ao.distill_loss(s, t, mask=torch.full((4,), 0.5)), "mask"),
    (lambda s, t: ao.distill_loss(s, t, agg="mean"), "agg"),
    (lambda s, t: ao.fused_linear_distill_loss(s, torch.randn(5, 7), s, torch.randn(6, 7)), "V = "),
    (lambda s, t: ao.fused_linear_distill_loss(s, torch.randn(5, 7), s[:3], torch.randn(5, 7)), "teacher_hidden"),
    (lambda s, t: ao.fused_linear_distill_loss(s, torch.randn(5, 6), s, torch.randn(5, 7)), "student_weight"),
])
def test_bad_input_names_the_argument(call, match):
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    with pytest.raises((TypeError, ValueError), match=match):
        call(s, t)
