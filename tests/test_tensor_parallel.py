"""The vocabulary-parallel lm_head in Megatron's tensor-parallel layout, 2 gloo ranks, against one
process in float64.

Megatron's output layer splits the vocabulary over the tensor-parallel group, and the hidden states
reach it through a region whose backward sums dhidden over that group:

- sequence parallel off: `copy_to_tensor_model_parallel_region` (forward identity, backward all_reduce);
- sequence parallel on: `gather_from_sequence_parallel_region` (forward all_gather of the token
  shards, backward reduce-scatter).

So an lm_head op inside that layout must hand back each rank's *partial* dhidden (its own vocabulary
rows' share): `reduce_hidden_grad=False`. Called without such a region (hidden states given alike on
every rank), the op sums it itself: the default. Either way dhidden is reduced exactly once; the
cases below show each convention equal to one process, and the wrong pairing off by the factor the
double sum gives. verl's `linear_cross_entropy` drop-in follows verl's kernel (partial dhidden): with
sequence parallel on it equals one process; with it off verl's fused forward has no summing region
and each rank keeps its partial (verl's own behaviour, asserted as such).

Regions are emulated here with the same collectives (gloo has no reduce_scatter: all_reduce, then
this rank's slice, which is the same sum). float64 on the cpu backend: every comparison is at 1e-10.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

import alignops as ao

pytestmark = pytest.mark.distributed

N, H, V, T = 12, 16, 38, 0.7   # V = 38: two shards of 19 rows (Megatron pads to a multiple of TP)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist  # noqa: PLC0415
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist  # noqa: PLC0415
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist  # noqa: PLC0415
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def data():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    c_logp = torch.randn(N, generator=g, dtype=torch.float64)
    c_ent = torch.randn(N, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, labels, c_logp, c_ent, adv


def objective(hidden, weight, labels, c_logp, c_ent, adv, route, **kw):
    """The scalar each case differentiates: token log-probs and entropy under cotangents, or a GRPO
    loss with an entropy bonus (default route or grad_in_forward)."""
    if route == "token_logprobs":
        logp, ent = ao.fused_linear_token_logprobs(hidden, weight, labels, temperature=T, compute_entropy=True,
                                                   backend="cpu", **kw)
        return (logp * c_logp).sum() + (ent * c_ent).sum()
    old = torch.full((N,), -3.0, dtype=torch.float64)
    return ao.fused_linear_policy_loss(hidden, weight, labels, old, adv, temperature=T, entropy_coef=0.1,
                                       cu_seqlens=torch.tensor([0, N]), backend="cpu",
                                       grad_in_forward=route == "grad_in_forward", **kw).loss


ROUTES = ("token_logprobs", "policy", "grad_in_forward")


def _worker(rank, port, outdir):
    import datetime

    import torch.distributed as dist

    from alignops.integrations import verl as aov
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    try:
        hidden, weight, labels, c_logp, c_ent, adv = data()
        rows = slice(rank * V // 2, (rank + 1) * V // 2)
        tokens = slice(rank * N // 2, (rank + 1) * N // 2)
        out = {}
        for route in ROUTES:
            for case in ("replicated", "sp_off", "sp_on", "sp_off_double"):
                h = (hidden[tokens] if case == "sp_on" else hidden).clone().requires_grad_()
                w = weight[rows].clone().requires_grad_()
                x = {"replicated": h, "sp_off": _CopyToTP.apply(h, group), "sp_off_double": _CopyToTP.apply(h, group),
                     "sp_on": _GatherFromSP.apply(h, group)}[case]
                kw = dict(vocab_process_group=group, vocab_start=rank * V // 2)
                if case in ("sp_off", "sp_on"):
                    kw["reduce_hidden_grad"] = False
                loss = objective(x, w, labels, c_logp, c_ent, adv, route, **kw)
                loss.backward()
                out[(route, case)] = {"loss": loss.detach(), "dhidden": h.grad, "dweight": w.grad}
        # verl's linear_cross_entropy drop-in, with and without the sequence-parallel gather
        for case in ("verl_sp_on", "verl_sp_off"):
            h = (hidden[tokens] if case == "verl_sp_on" else hidden).clone().requires_grad_()
            w = weight[rows].clone().requires_grad_()
            x = _GatherFromSP.apply(h, group) if case == "verl_sp_on" else h
            logp, ent = aov.linear_cross_entropy(x, w, labels.clamp(min=0), T, "none", group)
            ((logp * c_logp).sum() + (ent * c_ent).sum()).backward()
            out[case] = {"dhidden": h.grad, "dweight": w.grad}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(_free_port(), d), nprocs=2, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]


def truth(route, labels_clamped=False, partial_rows=None):
    """One process, the whole vocabulary, float64 autograd through plain torch math (not alignops):
    (loss, dhidden, dweight); with partial_rows, dhidden of that vocabulary slice's logits alone."""
    hidden, weight, labels, c_logp, c_ent, adv = data()
    if labels_clamped:
        labels = labels.clamp(min=0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = h @ w.T
    lp = torch.log_softmax(z / T, -1)
    valid = labels != -100
    logp = torch.where(valid, lp.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(lp.exp() * lp).sum(-1), 0.0)
    if route == "token_logprobs":
        loss = (logp * c_logp).sum() + (ent * c_ent).sum()
    else:  # GRPO on-policy-shaped with old_logp = -3: ratio r = exp(logp + 3), clip 0.2, token-mean, + 0.1 H
        r = torch.exp(logp + 3.0)
        pg = -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
        loss = (torch.where(valid, pg, 0.0).sum() - 0.1 * ent.sum()) / valid.sum()
    if partial_rows is not None:
        dz, = torch.autograd.grad(loss, z, retain_graph=True)
        return dz[:, partial_rows] @ w.detach()[partial_rows]
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), dh, dw


def close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=what)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", ["replicated", "sp_off", "sp_on"])
def test_dhidden_reduced_exactly_once_equals_one_process(ranks, route, case):
    loss, dh, dw = truth(route)
    for rank, res in enumerate(ranks):
        got = res[(route, case)]
        close(got["loss"], loss, f"{case} rank {rank} loss")
        rows, tokens = slice(rank * V // 2, (rank + 1) * V // 2), slice(rank * N // 2, (rank + 1) * N // 2)
        close(got["dweight"], dw[rows], f"{case} rank {rank} dweight shard")
        close(got["dhidden"], dh[tokens] if case == "sp_on" else dh, f"{case} rank {rank} dhidden")


@pytest.mark.parametrize("route", ROUTES)
def test_reducing_inside_a_summing_region_doubles_dhidden(ranks, route):
    """The default (summed here) under Megatron's sequence-parallel-off region: summed twice, 2x."""
    _, dh, _ = truth(route)
    for res in ranks:
        close(res[(route, "sp_off_double")]["dhidden"], 2 * dh, "dhidden summed twice")


def test_verl_drop_in_follows_verls_partial_dhidden(ranks):
    _, dh, dw = truth("token_logprobs", labels_clamped=True)
    for rank, res in enumerate(ranks):
        rows, tokens = slice(rank * V // 2, (rank + 1) * V // 2), slice(rank * N // 2, (rank + 1) * N // 2)
        # sequence parallel on: the gather's reduce-scatter sums the partials: one process's gradient
        close(res["verl_sp_on"]["dhidden"], dh[tokens], f"verl drop-in, SP on, rank {rank}")
        close(res["verl_sp_on"]["dweight"], dw[rows], f"verl drop-in, SP on, rank {rank} dweight")
        # sequence parallel off: nothing sums it, as with verl's own kernel: this rank's rows' share
        partial = truth("token_logprobs", labels_clamped=True, partial_rows=rows)
        close(res["verl_sp_off"]["dhidden"], partial, f"verl drop-in, SP off, rank {rank}: the partial dhidden")
        assert not torch.allclose(partial, dh)


def test_reduce_hidden_grad_false_needs_a_group():
    with pytest.raises(ValueError, match="reduce_hidden_grad"):
        ao.fused_linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]),
                                       reduce_hidden_grad=False)
