"""A vocabulary sharded over gloo ranks (vocab_process_group) equals one process on the whole vocabulary.

One spawned job of 4 gloo ranks runs every case below on its shards, over the 4-rank group
(V = 97), a 2-rank subgroup (V = 1031, every backend), a 3-rank subgroup (V = 151936 in prime-sized
shards) and groups of one, and saves the results; the parent runs the same cases on the whole vocabulary
without a group (the single-process path, itself held to float64 oracles by the other test files)
and compares: logp, entropy, loss, metrics and every gradient (the dlogits shard, dhidden, the
dweight and dbias shards). Cases: V not divisible by the world size with unequal shards, peaked
rows, -inf logits, a row whose whole shard is -inf, temperature != 1, ignore_index labels with
mask=None, an empty mask row, labels at both ends of every shard; grpo, dapo, gspo, cispo and an
entropy bonus with a KL term; the default, inplace_grad and grad_in_forward routes.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch

import alignops as ao
from alignops import _backend

pytestmark = pytest.mark.distributed

T_ROLL = 0.7
POLICY_CASES = [
    ("grpo", {}),
    ("dapo", {"clip_high": 0.28}),
    ("gspo", {}),
    ("cispo", {}),
    ("grpo", {"entropy_coef": 0.03, "kl_coef": 0.05, "agg": "seq-mean-token-mean"}),
]


def shard_sizes(V: int, world: int) -> list[int]:
    """Unequal shards: rank r holds about (r + 1) parts, the last rank the remainder."""
    base = V // (world * (world + 1) // 2)
    sizes = [base * (r + 1) for r in range(world - 1)]
    return sizes + [V - sum(sizes)]


def _logits(B, T, V, sizes, gen, dtype):
    x = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    x[0, 1, torch.randint(0, V, (1,), generator=gen)] += 50          # peaked
    x[1, 2, 3] += 60                                                  # peaked in shard 0
    x[1, 3][torch.rand(V, generator=gen) < 0.3] = -math.inf           # scattered -inf
    x[2, 0, : sizes[0]] = -math.inf                                    # shard 0 entirely -inf
    return x.to(dtype)


def _labels(B, T, V, sizes, gen, x):
    y = torch.randint(0, V, (B, T), generator=gen)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    flat = y.view(-1)
    for r, (s, n) in enumerate(zip(starts, sizes)):  # both ends of every shard
        flat[2 * r % flat.numel()] = s
        flat[(2 * r + 1) % flat.numel()] = s + n - 1
    y[2, 0] = sizes[0] + 1                          # the -inf shard's row points elsewhere
    y[0, T - 1] = -100
    y[3, 2] = -100
    # the policy cases' labels have finite logits (a -inf label gives logp = -inf, tested separately)
    bad = torch.isinf(x.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)) & (y != -100)
    y[bad] = torch.argmax(x, -1)[bad]
    return y


def make_data(V: int, sizes: list[int], dtype: torch.dtype, seed: int):
    """The same inputs for both dtypes: drawn in float64 and rounded to float32, so the float64 run
    is the exact-math reference of the float32 one."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H = 4, 6, 8
    x = _logits(B, T, V, sizes, gen, torch.float64)
    y = _labels(B, T, V, sizes, gen, x)
    with torch.no_grad():
        logp0 = ao.token_logprobs(x, y, temperature=T_ROLL, backend="torch")
    old = (logp0 + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).to(torch.float32)
    ref = (logp0 - 0.2 * torch.rand(B, T, generator=gen, dtype=torch.float64)).to(torch.float32)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[3] = False                                  # an empty row
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    # a -inf label and a fully -inf row for the log-prob-only case
    x_inf = x.clone()
    y_inf = y.clone()
    x_inf[1, 3, y[1, 3].clamp_min(0)] = -math.inf
    def cast(t):
        return t.to(torch.float32).to(dtype)
    return dict(x=cast(x), x_inf=cast(x_inf), y=y, y_inf=y_inf, old=cast(old), ref=cast(ref), adv=cast(adv),
                mask=mask, hidden=cast(hidden), weight=cast(weight), bias=cast(bias))


def _leaf(t):
    return t.detach().clone().requires_grad_()


def run_cases(V: int, sizes: list[int], start: int, size: int, group, backends, *, vocab_start_mode: str = "gather"):
    """Every case on the shard [start, start + size) (group is None: the whole vocabulary, one
    process); `sizes` is the sharding the data is built for (its -inf shard, its labels).
    backends: {name: "full" | "light"}; light (the interpreted triton kernels) runs the -inf token
    case and a grpo loss."""
    kw = {} if group is None else {"vocab_process_group": group}
    if group is not None and vocab_start_mode == "given":
        kw["vocab_start"] = start
    shard = slice(start, start + size)
    out = {}
    for dtype in (torch.float64, torch.float32):
        d = make_data(V, sizes, dtype, seed=V)
        for backend in backends:
            if dtype == torch.float64 and backend == "triton":
                continue
            tag = f"{backend}/{str(dtype)[6:]}"
            # token log-probs and entropy, both gradients at once
            for xname in ("x", "x_inf"):
                if backends[backend] == "light" and xname == "x":
                    continue
                z = _leaf(d[xname][..., shard])
                logp, ent = ao.token_logprobs(z, d["y_inf" if xname == "x_inf" else "y"], temperature=T_ROLL,
                                              compute_entropy=True, backend=backend, **kw)
                w = torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype).view(logp.shape)
                (torch.where(torch.isfinite(logp), logp, 0.0) * w).sum().add((ent * w.flip(0)).sum()).backward()
                out[f"{tag}/tokens/{xname}"] = {"logp": logp.detach(), "entropy": ent.detach(), "dlogits": z.grad}
            # policy losses on every route
            for method, opts in POLICY_CASES:
                for route in ("default", "inplace_grad", "grad_in_forward"):
                    if route != "default" and backend != "cpu":
                        continue
                    if backends[backend] == "light" and (route != "default" or opts or method != "grpo"):
                        continue
                    z = _leaf(d["x"][..., shard])
                    zin = z.clone() if route == "inplace_grad" else z
                    res = ao.fused_policy_loss(
                        zin, d["y"], d["old"], d["adv"], None, method=method, temperature=T_ROLL, backend=backend,
                        inplace_grad=route == "inplace_grad", grad_in_forward=route == "grad_in_forward",
                        ref_logp=d["ref"] if opts.get("kl_coef") else None, **opts, **kw)
                    (res.loss * 1.5).backward()
                    key = f"{tag}/policy/{method}{'+ent' if opts.get('entropy_coef') else ''}/{route}"
                    out[key] = {"loss": res.loss.detach(), "dlogits": z.grad,
                                **{f"metric:{k}": v for k, v in res.metrics.items()}}
            if backends[backend] == "light":
                continue
            # the usual shift, read in place: rows of a [B, T + 1, V_r] buffer, the gradient written into it
            buf = _leaf(torch.cat([d["x"][..., shard], d["x"][:, :1, shard]], 1))
            res = ao.fused_policy_loss(buf.clone()[:, :-1], d["y"], d["old"], d["adv"], None, method="dapo",
                                       temperature=T_ROLL, backend=backend, inplace_grad=backend == "cpu",
                                       entropy_coef=0.02, **kw)
            res.loss.backward()
            out[f"{tag}/policy/dapo-shifted-rows"] = {"loss": res.loss.detach(), "dlogits": buf.grad[:, :-1]}
            # an explicit mask with an empty row
            z = _leaf(d["x"][..., shard])
            res = ao.fused_policy_loss(z, d["y"], d["old"], d["adv"], d["mask"], method="grpo", temperature=T_ROLL,
                                       backend=backend, **kw)
            res.loss.backward()
            out[f"{tag}/policy/grpo-mask"] = {"loss": res.loss.detach(), "dlogits": z.grad}
            # the fused lm_head: several chunks, a bias, softcap
            for softcap in (None, 30.0):
                h, W, b = _leaf(d["hidden"]), _leaf(d["weight"][shard]), _leaf(d["bias"][shard])
                logp, ent = ao.fused_linear_token_logprobs(h, W, d["y"], b, temperature=T_ROLL, compute_entropy=True,
                                                           softcap=softcap, backend=backend, chunk_size=7, **kw)
                w = torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype).view(logp.shape)
                ((logp * w).sum() + (ent * w.flip(0)).sum()).backward()
                out[f"{tag}/linear_tokens/softcap={softcap}"] = {"logp": logp.detach(), "entropy": ent.detach(),
                                                                 "dhidden": h.grad, "dweight": W.grad, "dbias": b.grad}
            for method, opts in POLICY_CASES:
                for gif in (False, True):
                    h, W, b = _leaf(d["hidden"]), _leaf(d["weight"][shard]), _leaf(d["bias"][shard])
                    res = ao.fused_linear_policy_loss(
                        h, W, d["y"], d["old"], d["adv"], None, method=method, bias=b, temperature=T_ROLL,
                        backend=backend, grad_in_forward=gif, chunk_size=5,
                        ref_logp=d["ref"] if opts.get("kl_coef") else None, **opts, **kw)
                    (res.loss * 0.5).backward()
                    key = f"{tag}/linear_policy/{method}{'+ent' if opts.get('entropy_coef') else ''}/gif={gif}"
                    out[key] = {"loss": res.loss.detach(), "dhidden": h.grad, "dweight": W.grad, "dbias": b.grad,
                                **{f"metric:{k}": v for k, v in res.metrics.items()}}
            h, W = _leaf(d["hidden"]), _leaf(d["weight"][shard])
            seq = ao.fused_linear_sequence_logprobs(h, W, d["y"], agg="mean", temperature=T_ROLL, backend=backend,
                                                    chunk_size=9, **kw)
            sft = ao.fused_linear_sft_loss(h, W, d["y"], weighting="dft", temperature=T_ROLL, backend=backend, **kw)
            (seq.sum() + sft.loss).backward()
            out[f"{tag}/linear_seq_sft"] = {"seq": seq.detach(), "sft": sft.loss.detach(), "dhidden": h.grad,
                                            "dweight": W.grad}
            z = _leaf(d["x"][..., shard])
            seq = ao.sequence_logprobs(z, d["y"], temperature=T_ROLL, backend=backend, **kw)
            sft = ao.sft_loss(z, d["y"], weighting="chord_phi", temperature=T_ROLL, backend=backend, **kw)
            (seq.sum() + sft.loss).backward()
            out[f"{tag}/seq_sft"] = {"seq": seq.detach(), "sft": sft.loss.detach(), "dlogits": z.grad}
    return out


def run_big_vocab(rank, group, sizes):
    """Qwen's V = 151936 over 3 unequal shards, peaked rows, packed layout: token stats and a dapo
    loss with an entropy bonus, float64 and float32."""
    V = sum(sizes)
    gen = torch.Generator().manual_seed(7)
    x64 = (torch.randn(3, V, generator=gen, dtype=torch.float64) * 3).float().double()
    x64[0, 151935] += 40       # peak in the last shard, label in the first
    x64[1, 0] += 40
    y = torch.tensor([0, 151935, 75000])
    start, size = (0, V) if group is None else (sum(sizes[:rank]), sizes[rank])
    kw = {} if group is None else {"vocab_process_group": group, "vocab_start": start}
    out = {}
    for dtype in (torch.float64, torch.float32):
        z = _leaf(x64[:, start:start + size].to(dtype))
        res = ao.fused_policy_loss(z, y, None, torch.tensor([1.0, -1.0, 0.5], dtype=dtype), None, method="dapo",
                                   temperature=0.9, entropy_coef=0.01, backend="cpu", cu_seqlens=torch.tensor([0, 3]),
                                   **kw)
        res.loss.backward()
        logp, ent = ao.token_logprobs(z.detach(), y, temperature=0.9, compute_entropy=True, backend="cpu", **kw)
        out[f"cpu/{str(dtype)[6:]}/big"] = {"loss": res.loss.detach(), "dlogits": z.grad, "logp": logp,
                                             "entropy": ent}
    return out


def error_cases(rank, group, sizes, V):
    """Messages of the errors raised on every rank alike (a rank that raised alone would hang the rest)."""
    start, size = sum(sizes[:rank]), sizes[rank]
    z = torch.randn(2, size)
    msgs = {}
    for name, call in {
        "label_out_of_range": lambda: ao.token_logprobs(z, torch.tensor([0, V]), vocab_process_group=group),
        "bad_vocab_start": lambda: ao.token_logprobs(z, torch.tensor([0, 1]), vocab_process_group=group,
                                                     vocab_start=start + 1),
        "nonfinite": lambda: ao.token_logprobs(torch.where(torch.tensor(rank == 1), torch.full_like(z, math.nan), z),
                                               torch.tensor([0, 1]), vocab_process_group=group, check_finite=True),
        "linear_label": lambda: ao.fused_linear_token_logprobs(torch.randn(2, 4), torch.randn(size, 4),
                                                               torch.tensor([-3, 1]), vocab_process_group=group),
    }.items():
        try:
            call()
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    return msgs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir, triton):
    """One job of 4 ranks: the 4-rank group, a 2-rank subgroup, a 3-rank subgroup (V = 151936) and
    groups of one, one after the other (a spawn costs seconds; a subgroup exercises the group's own
    rank and size)."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        # every rank creates every group, in the same order
        pair, triple = dist.new_group([0, 1]), dist.new_group([0, 1, 2])
        singles = [dist.new_group([r]) for r in range(world)]
        res = {}
        V, sizes = WORLD_VOCAB[4], shard_sizes(WORLD_VOCAB[4], 4)
        res[4] = {"cases": run_cases(V, sizes, sum(sizes[:rank]), sizes[rank], dist.group.WORLD, {"cpu": "full"},
                                     vocab_start_mode="given"),
                  "errors": error_cases(rank, dist.group.WORLD, sizes, V)}
        if rank < 2:
            V, sizes = WORLD_VOCAB[2], shard_sizes(WORLD_VOCAB[2], 2)
            res[2] = {"cases": run_cases(V, sizes, sum(sizes[:rank]), sizes[rank], pair, backends_for(2, triton)),
                      "errors": error_cases(rank, pair, sizes, V)}
        else:  # meanwhile: a group of one is the plain path
            V = WORLD_VOCAB[4]
            res["single"] = run_cases(V, shard_sizes(V, 4), 0, V, singles[rank], {"cpu": "full"})
        if rank < 3:
            res[3] = run_big_vocab(rank, triple, BIG_SIZES)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


BIG_SIZES = [50021, 50023, 151936 - 100044]  # primes, then the remainder
WORLD_VOCAB = {2: 1031, 4: 97}


def backends_for(world, triton):
    """The 2-rank group runs every backend; the 4-rank group the cpu one."""
    if world == 4:
        return {"cpu": "full"}
    return {"cpu": "full", "torch": "full", **({"triton": "light"} if triton else {})}


def _has_triton():
    return "triton" in _backend.available_backends(torch.device("cpu"))


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(4, _free_port(), d, _has_triton()), nprocs=4, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(4)]


def _shard_of(key, full, start, size):
    if key == "dlogits":
        return full[..., start:start + size]
    if key in ("dweight", "dbias"):
        return full[start:start + size]
    return full


def _check(got, want, exact, msg):
    """float64: equal to the single process within 1e-10. float32: the sum over shards may round
    differently from the single process (a GEMM's or the lse's order), so it is held to the
    project's low-precision rule (docs/design.md, Tests): against float64 math on the same inputs,
    an error at most twice the single process's, or within 1e-5 of the output's scale."""
    if got.dtype == torch.float64 or exact is None:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{msg}: {m}")
        return
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{msg}: non-finite entries differ"
    assert torch.equal(got[~torch.isfinite(got)], want[~torch.isfinite(want)]), f"{msg}: infinities differ"
    fin = torch.isfinite(exact)
    exact, want, got = exact[fin], want[fin].double(), got[fin].double()
    if exact.numel() == 0:
        return
    err_single = (want - exact).abs().max().item()
    err_sharded = (got - exact).abs().max().item()
    bound = max(2 * err_single, 1e-5 * exact.abs().max().item())
    assert err_sharded <= bound, (f"{msg}: error {err_sharded:.3g} vs float64 > {bound:.3g} "
                                  f"(single process {err_single:.3g})")


def _compare(whole, ranks, sizes, what):
    for case, want in whole.items():
        backend, dtype, rest = case.split("/", 2)
        ref64 = whole[f"cpu/float64/{rest}"] if dtype == "float32" else None  # triton has no float64
        for r, got in enumerate(ranks):
            start, size = sum(sizes[:r]), sizes[r]
            assert set(got[case]) == set(want), f"{what} {case} rank {r}: outputs differ"
            for key, full in want.items():
                g = got[case][key]
                assert g is not None and full is not None, f"{what} {case} {key}: a gradient is None"
                exact = None if ref64 is None else _shard_of(key, ref64[key], start, size)
                _check(g, _shard_of(key, full, start, size), exact, f"{what} {case} {key} rank {r}")
        # the merged statistics are bitwise the same on every rank
        for key in ("logp", "entropy", "loss", "seq", "sft", "dhidden"):
            if key in want:
                for r in range(1, len(ranks)):
                    assert torch.equal(ranks[r][case][key], ranks[0][case][key]), f"{what} {case} {key}: rank {r}"


@pytest.fixture(scope="module")
def whole():
    """Single process, whole vocabulary, no group (one thread: these shapes are tiny, and threads
    only contend with the spawned ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {w: run_cases(V, shard_sizes(V, w), 0, V, None, backends_for(w, _has_triton()))
               for w, V in WORLD_VOCAB.items()}
        out[3] = run_big_vocab(0, None, BIG_SIZES)
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [4, 2])
def test_sharded_vocabulary_equals_one_process(world, ranks, whole):
    V, sizes = WORLD_VOCAB[world], shard_sizes(WORLD_VOCAB[world], world)
    assert len(set(sizes)) > 1 and V % world != 0
    _compare(whole[world], [ranks[r][world]["cases"] for r in range(world)], sizes, f"world={world} V={V}")


def test_qwen_vocabulary_over_three_prime_shards(ranks, whole):
    _compare(whole[3], [ranks[r][3] for r in range(3)], BIG_SIZES, "V=151936 over 3 ranks")


def test_group_of_one_rank_is_the_plain_path(ranks, whole):
    """Bitwise on the cpu backend, except where the plain path runs the one-launch kernel (a
    token-local grad_in_forward loss), which the sharded path cannot (its loss is summed by the kernel)."""
    for r in (2, 3):
        for case, want in whole[4].items():
            for key, full in want.items():
                got = ranks[r]["single"][case][key]
                if "gif=True" in case or "grad_in_forward" in case:
                    _, dtype, rest = case.split("/", 2)
                    exact = whole[4][f"cpu/float64/{rest}"][key] if dtype == "float32" else None
                    _check(got, full, exact, f"group of one, rank {r}: {case} {key}")
                else:
                    assert torch.equal(got, full), f"group of one, rank {r}: {case} {key}"


@pytest.mark.parametrize("world", [4, 2])
def test_errors_are_raised_on_every_rank(world, ranks):
    V = WORLD_VOCAB[world]
    for r in range(world):
        e = ranks[r][world]["errors"]
        assert e["label_out_of_range"] is not None and "labels" in e["label_out_of_range"] \
            and f"[0, {V})" in e["label_out_of_range"], e
        assert e["linear_label"] is not None and "labels" in e["linear_label"], e
        assert e["bad_vocab_start"] is not None and "vocab_start" in e["bad_vocab_start"], e
        assert e["nonfinite"] is not None and "check_finite" in e["nonfinite"] and "[1]" in e["nonfinite"], e


def test_vocab_group_needs_initialised_distributed():
    import torch.distributed as dist
    assert not dist.is_initialized()
    GROUP = object()  # a stand-in: before init_process_group, dist.group.WORLD is None
    z, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="vocab_process_group.*not initialized"):
        ao.token_logprobs(z, y, vocab_process_group=GROUP)
    with pytest.raises(ValueError, match="vocab_process_group.*not initialized"):
        ao.fused_policy_loss(z, y, None, torch.ones(3), vocab_process_group=GROUP,
                             cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="vocab_process_group.*not initialized"):
        ao.fused_linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 4), y, vocab_process_group=GROUP)
    with pytest.raises(ValueError, match="vocab_start was given without vocab_process_group"):
        ao.token_logprobs(z, y, vocab_start=0)
