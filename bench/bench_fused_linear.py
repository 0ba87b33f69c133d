"""Fused lm_head: log-probs + entropy and the GRPO loss straight from hidden states and the lm_head
weight (the [N, V] logits never formed), forward and backward, against the bare GEMMs and the
paths trainers run today.

    python -m bench.bench_fused_linear                # CPU: N=4096 H=1024, V in {32000, 151936}, fp32
    python -m bench.bench_fused_linear --quick        # CPU: N=512 H=256 V=32000 (well under a minute)
    python -m bench.bench_fused_linear --device cuda  # N=8192 H=4096, V in {128256, 151936}, bf16
    python -m bench.bench_fused_linear --size N=64,H=64,V=1000 --isa here  # toy case (gpu.sh --dry-run)

Every implementation maps {hidden [N, H], weight [V, H] (both with grad), labels, old, ref, adv,
mask} to a scalar; gradients go to hidden and weight. Peak = memory above the inputs, so it counts
dhidden and dweight (dweight alone is V * H * 4 bytes: 125 MiB at V=32000, 594 MiB at V=151936).

gemms                   the floor: logits = hidden @ W.T (summed) forward; backward dH = G @ W and
                        dW = G.T @ hidden with G the saved [N, V] logits buffer standing in for the
                        upstream gradient (its values do not change a GEMM's time). Three GEMMs and
                        no softmax; its memory is that of the full logits (+ dH, dW).
log-probs + entropy (loss = logp.sum() + entropy.sum(), temperature 0.9):
  lp/alignops           ao.fused_linear_token_logprobs(hidden, W, labels, compute_entropy=True):
                        logits tiles of 64 MiB through the token_stats kernels; backward recomputes
                        each tile (four GEMMs in all).
  lp/eager              logits = hidden @ W.T, then log_softmax / gather / entropy from the softmax
                        under autograd (bench_token_logprobs.eager_logprobs_entropy).
  lp/logits+alignops    ao.token_logprobs(hidden @ W.T, labels, compute_entropy=True): the fused
                        softmax on materialized logits.
  lp/trl                trl.kernels.chunked_logprob.ChunkedLogProbFunction (trl 1.16.0) with
                        TOKEN_CHUNK_SIZE tokens x 32768 vocabulary tiles (TRL's own
                        _CHUNKED_LOGPROB_CHUNK_SIZE), outputs=("entropy",). Off Triton devices its
                        tile folds are torch ops; backward recomputes the tiles (four GEMMs).
GRPO (token-mean, clip 0.2, k3 KL 0.04, entropy bonus 0.01, as bench_policy_loss):
  grpo/alignops         ao.fused_linear_policy_loss(..., method="grpo", kl_estimator="k3", ...).
  grpo/alignops+gif     the same, grad_in_forward=True: the one-launch kernel on each tile, gradients
                        taken during forward (three GEMMs).
  grpo/logits+alignops  ao.fused_policy_loss(hidden @ W.T, ...).
  grpo/eager            bench_policy_loss.eager_grpo(hidden @ W.T, ...).
  grpo/liger(no entropy), grpo/liger compiled(no entropy)
                        liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (liger-kernel 0.8.5),
                        compiled=False / True, its defaults otherwise (chunk_size=1 sequence,
                        loss_type="dapo" = token-mean here, 2048 x 4096 logits tiles). It computes
                        no entropy (no entropy bonus, so it does less work than the others), and it
                        takes the gradients inside forward whatever autograd wants: its "fwd" row
                        is forward + backward.

The peers are benchmark extras (`make bench-extras`); one that does not import or run is left out
and the reason goes to the table's notes, as does an implementation skipped because its estimated
peak memory would not fit in the memory available.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

import alignops as ao
from bench.bench_policy_loss import CLIP, ENT_COEF, KL_COEF, eager_grpo
from bench.bench_token_logprobs import eager_logprobs_entropy
from bench.harness import Case, bench_main, machine_description, machine_name, out_dir_of

TEMPERATURE = 0.9
NOTES_ENV = "ALIGNOPS_BENCH_FUSED_LINEAR_NOTES"
MEM_MARGIN = 2 << 30  # bytes left free beyond an implementation's estimated peak

# Estimated peak extra memory per implementation: (forward-only, with backward) multiples of one
# fp32 [N, V] buffer, measured at N=4096 H=1024 V=32000 on CPU and rounded up; the backward
# figure excludes dH and dW (added separately). Chunked implementations: fixed tile bytes.
_LOGITS_MULT = {
    "gemms": (1.0, 1.0),
    "lp/eager": (4.0, 6.0),
    "lp/logits+alignops": (1.0, 2.0),
    "grpo/logits+alignops": (1.0, 2.0),
    "grpo/eager": (4.0, 8.0),
}
_TILE_BYTES = {"lp/alignops": 256 << 20, "grpo/alignops": 256 << 20, "grpo/alignops+gif": 256 << 20,
               "lp/trl": 5 << 30, "grpo/liger(no entropy)": 1 << 30, "grpo/liger compiled(no entropy)": 1 << 30}


# --------------------------------------------------------------------------------------------
# notes: why a peer or an implementation is missing (child processes append, the parent writes)


def _note(case: str, impl: str, why: str) -> None:
    path = os.environ.get(NOTES_ENV)
    line = json.dumps({"case": case, "impl": impl, "why": why})
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    print(f"  note: {case}: {impl}: {why}", flush=True)


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def estimated_peak(impl: str, n: int, h: int, v: int, elem: int, backward: bool) -> int:
    grads = (n + v) * h * 4 if backward else 0  # dH, dW (fp32 accumulators for half inputs)
    if impl in _LOGITS_MULT:
        mult = _LOGITS_MULT[impl][1 if backward else 0]
        return int(mult * n * v * 4) + grads
    return _TILE_BYTES.get(impl, 0) + grads


class _Skipped(RuntimeError):
    pass


def _guard(case_name, impl, fn, n, h, v, elem):
    """fn, refusing to run (harness skips it) when its estimated peak does not fit, and writing
    down any failure of a peer."""
    noted = set()

    def run(x):
        device = x["hidden"].device
        backward = x["hidden"].requires_grad
        need = estimated_peak(impl, n, h, v, elem, backward)
        free = _free_bytes(device)
        if need + MEM_MARGIN > free:
            why = (f"skipped: estimated peak {need / 2**30:.1f} GiB + {MEM_MARGIN / 2**30:.0f} GiB margin > "
                   f"{free / 2**30:.1f} GiB available ({'fwd+bwd' if backward else 'fwd'})")
            if why.split(" (")[0] not in noted:
                noted.add(why.split(" (")[0])
                _note(case_name, impl, why)
            raise _Skipped(why)
        try:
            return fn(x)
        except Exception as e:
            why = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if why not in noted:
                noted.add(why)
                _note(case_name, impl, why)
            raise

    return run


# --------------------------------------------------------------------------------------------
# the floor


class _BareGemms(torch.autograd.Function):
    """logits = hidden @ W.T (returned summed); backward dH = G @ W, dW = G.T @ hidden with G the
    saved logits buffer (a real loss writes dL/dz into such a buffer; the values do not change a
    GEMM's time). grad_output (1.0 here) is ignored: no elementwise pass over [N, V]."""

    @staticmethod
    def forward(ctx, hidden, weight):
        z = hidden @ weight.t()
        ctx.save_for_backward(hidden, weight, z)
        return z.sum(dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, g = ctx.saved_tensors
        dh = g @ weight if ctx.needs_input_grad[0] else None
        dw = g.t() @ hidden if ctx.needs_input_grad[1] else None
        return dh, dw


# --------------------------------------------------------------------------------------------
# peers


def _trl_logprobs():
    """TRL's ChunkedLogProbFunction as its fused lm_head calls it (tiles of TOKEN_CHUNK_SIZE tokens
    x _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary entries). Its backward imports maybe_gather_lm_head_ctx
    from trl.trainer.utils, a module that needs pandas, accelerate and datasets (not installed with
    --no-deps); without them the benchmark registers a stand-in whose maybe_gather_lm_head_ctx is
    the null context TRL's own returns when DeepSpeed ZeRO-3 is off. The kernel itself is TRL's."""
    import contextlib  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import re  # noqa: PLC0415
    import types  # noqa: PLC0415

    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: PLC0415

    try:
        import trl.trainer.utils as trl_utils  # noqa: PLC0415
    except ImportError:
        vocab_chunk = 32768  # trl 1.16.0's _CHUNKED_LOGPROB_CHUNK_SIZE, read from its source below
        spec = importlib.util.find_spec("trl.trainer.utils")
        if spec is not None and spec.origin:
            m = re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE\s*=\s*(\d+)", open(spec.origin).read(), re.M)
            vocab_chunk = int(m.group(1)) if m else vocab_chunk
        trl_utils = types.ModuleType("trl.trainer.utils")
        trl_utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab_chunk
        trl_utils.__doc__ = "stand-in registered by bench/bench_fused_linear.py (ZeRO-3 off)"
        sys.modules["trl.trainer.utils"] = trl_utils
        _note("all cases", "lp/trl", "ran with a stand-in for trl.trainer.utils (it imports pandas, accelerate "
              "and datasets, not installed): maybe_gather_lm_head_ctx = the null context TRL's returns "
              "without DeepSpeed ZeRO-3; the kernel is TRL's")
    vocab_chunk = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE

    def run(hidden, weight, labels):
        logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, TEMPERATURE, vocab_chunk,
                                                         None, 1.0, ("entropy",))
        return logp, entropy

    return run


# --------------------------------------------------------------------------------------------
# the case


def make_case(b, t, h, v, dtype, device, backend=None, warmup=None, reps=None):
    n = b * t
    dt = str(dtype).replace("torch.", "")
    name = f"N={n} H={h} V={v} {dt}"
    cache = {}

    def make_inputs():
        if not cache:
            g = torch.Generator(device="cpu").manual_seed(0)
            hidden = torch.randn(n, h, generator=g).to(dtype=dtype, device=device)
            # logits of standard deviation ~2, as the logits benchmarks draw them
            weight = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(dtype=dtype, device=device)
            labels = torch.randint(0, v, (b, t), generator=g).to(device)
            with torch.no_grad():
                logp = ao.fused_linear_token_logprobs(hidden.view(b, t, h), weight, labels,
                                                      temperature=TEMPERATURE).float()
            cache.update(
                hidden=hidden, weight=weight, labels=labels,
                old=(logp + 0.1 * torch.randn(b, t, generator=g).to(device)).contiguous(),
                ref=(logp + 0.1 * torch.randn(b, t, generator=g).to(device)).contiguous(),
                adv=torch.randn(b, generator=g).to(device),
                mask=(torch.rand(b, t, generator=g) > 0.1).to(device))
        return dict(cache)  # the implementations never write their inputs

    def h3(x):
        return x["hidden"].view(b, t, h)

    def grpo_logits(x, **kw):
        return ao.fused_policy_loss(h3(x) @ x["weight"].t(), x["labels"], x["old"], x["adv"], x["mask"],
                                    method="grpo", temperature=TEMPERATURE, clip_low=CLIP, ref_logp=x["ref"],
                                    kl_coef=KL_COEF, kl_estimator="k3", entropy_coef=ENT_COEF,
                                    backend=backend).loss

    def grpo_fused(x, **kw):
        return ao.fused_linear_policy_loss(h3(x), x["weight"], x["labels"], x["old"], x["adv"], x["mask"],
                                           method="grpo", temperature=TEMPERATURE, clip_low=CLIP,
                                           ref_logp=x["ref"], kl_coef=KL_COEF, kl_estimator="k3",
                                           entropy_coef=ENT_COEF, backend=backend, **kw).loss

    impls = {
        "gemms": lambda x: _BareGemms.apply(x["hidden"], x["weight"]),
        "lp/alignops": lambda x: ao.fused_linear_token_logprobs(
            h3(x), x["weight"], x["labels"], compute_entropy=True, temperature=TEMPERATURE, backend=backend),
        "lp/eager": lambda x: eager_logprobs_entropy(h3(x) @ x["weight"].t(), x["labels"]),
        "lp/logits+alignops": lambda x: ao.token_logprobs(
            h3(x) @ x["weight"].t(), x["labels"], temperature=TEMPERATURE, compute_entropy=True, backend=backend),
    }
    try:
        trl_lp = _trl_logprobs()
        impls["lp/trl"] = lambda x: trl_lp(x["hidden"], x["weight"], x["labels"].reshape(-1))
    except Exception as e:  # noqa: BLE001 - a peer that does not import is reported, not fatal
        _note(name, "lp/trl", f"not run: {type(e).__name__}: {e}")

    impls.update({
        "grpo/alignops": grpo_fused,
        "grpo/alignops+gif": lambda x: grpo_fused(x, grad_in_forward=True),
        "grpo/logits+alignops": grpo_logits,
        "grpo/eager": lambda x: eager_grpo(h3(x) @ x["weight"].t(), x["labels"], x["old"], x["ref"], x["adv"],
                                           x["mask"]),
    })
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: PLC0415
        for label, compiled in (("grpo/liger(no entropy)", False), ("grpo/liger compiled(no entropy)", True)):
            loss_fn = LigerFusedLinearGRPOLoss(beta=KL_COEF, compiled=compiled, use_ref_model=True,
                                               epsilon_low=CLIP, epsilon_high=CLIP, temperature=TEMPERATURE)

            def liger(x, loss_fn=loss_fn):
                loss, _metrics = loss_fn(h3(x), x["weight"], x["labels"], x["mask"].float(), x["adv"],
                                         ref_per_token_logps=x["ref"], old_per_token_logps=x["old"])
                return loss

            impls[label] = liger
    except Exception as e:  # noqa: BLE001
        _note(name, "grpo/liger", f"not run: {type(e).__name__}: {e}")

    elem = torch.finfo(dtype).bits // 8
    impls = {k: _guard(name, k, fn, n, h, v, elem) for k, fn in impls.items()}
    return Case(name, {"N": n, "H": h, "V": v, "dtype": dt, "device": device}, make_inputs, impls,
                grad_inputs=("hidden", "weight"), warmup=warmup, reps=reps)


def cases_for(device: str, quick: bool = False, size: dict | None = None):
    if size:  # --size N=..,H=..,V=..[,T=..]: one case of B = N / T sequences of T tokens (T: min(256, N))
        t = size.get("T", min(256, size["N"]))
        return [make_case(max(1, size["N"] // t), t, size["H"], size["V"],
                          torch.bfloat16 if device == "cuda" else torch.float32, device)]
    if device == "cuda":
        shapes = [(32, 256, 4096, 128256), (32, 256, 4096, 151936)] if not quick else [(4, 256, 4096, 151936)]
        return [make_case(b, t, h, v, torch.bfloat16, device) for b, t, h, v in shapes]
    if quick:  # a smoke run: every implementation and mode once, about 20 s per ISA level
        return [make_case(4, 128, 128, 8192, torch.float32, device, warmup=0, reps=1)]
    # On 2 cores one forward + backward takes 3-10 s at V=32000 and 20-60 s at V=151936: one
    # warm-up and 3 timed repeats at V=32000; at V=151936 no warm-up (every run maps fresh pages
    # anyway; Liger's compiled loss math has the same [1, T] shapes as at V=32000, compiled there)
    # and one timed run after the memory run, to keep the table to about an hour.
    return [make_case(16, 256, 1024, 32000, torch.float32, device, warmup=1, reps=3),
            make_case(16, 256, 1024, 151936, torch.float32, device, warmup=0, reps=1)]


# --------------------------------------------------------------------------------------------
# summary, notes and the plot (parent process only)


def _family(impl):
    return impl.split("/", 1)[0] if "/" in impl else None


def summary_lines(rows: list[dict]) -> list[str]:
    by = {}
    for r in rows:
        by[(r.get("isa", ""), r["case"], r["impl"], r["mode"])] = r
    keys = sorted({(r.get("isa", ""), r["case"], r["V"]) for r in rows}, key=lambda k: (k[2], k[0]))
    out = ["## Summary", "",
           "ms = median; x gemms = time / the bare GEMMs' time in the same mode (goal: fwd+bwd <= 1.15x); "
           "peak = peak extra MiB with backward (fwd+bwd mode), and as % of the same family's eager peak "
           "(goal: <= 10 %). The gemms row's peak is the full logits (+ dH, dW).", "",
           "| isa | case | impl | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd x gemms | peak MiB | % of eager peak |",
           "|---|---|---|---|---|---|---|---|---|"]
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    for isa, case, _v in keys:
        base = by.get((isa, case, "gemms", "fwd+bwd"))
        for impl in impls:
            fb = by.get((isa, case, impl, "fwd+bwd"))
            if fb is None and not any(by.get((isa, case, impl, m)) for m in ("fwd", "bwd")):
                continue
            cells = [f"{by[(isa, case, impl, m)]['ms']:.0f}" if (isa, case, impl, m) in by else "—"
                     for m in ("fwd", "bwd", "fwd+bwd")]
            ratio = f"{fb['ms'] / base['ms']:.2f}x" if fb and base else "—"
            peak = f"{fb['peak_extra_MiB']:.0f}" if fb else "—"
            fam = _family(impl)
            eager = by.get((isa, case, f"{fam}/eager", "fwd+bwd")) if fam else None
            pct = (f"{100 * fb['peak_extra_MiB'] / eager['peak_extra_MiB']:.1f} %"
                   if fb and eager and eager["peak_extra_MiB"] > 0 else "—")
            out.append(f"| {isa} | {case} | {impl} | {' | '.join(cells)} | {ratio} | {peak} | {pct} |")
    return out


def write_extras(rows: list[dict], notes: list[dict], argv_desc: str, out_dir: str) -> None:
    base = os.path.join(out_dir, f"fused_linear-{machine_name()}")
    grouped = {}  # one line per (case, impl, reason); a skip repeated per mode and level counted
    for nt in notes:
        grouped.setdefault((nt["case"], nt["impl"], nt["why"].split(" > ")[0]), []).append(nt["why"])
    note_lines = []
    for (case, impl, _), whys in grouped.items():
        more = f" (noted {len(whys)} times: once per mode or ISA level run)" if len(whys) > 1 else ""
        note_lines.append(f"- {case}: `{impl}` {whys[0]}{more}")
    with open(base + ".md", "a") as f:
        f.write("\n" + "\n".join(summary_lines(rows)) + "\n")
        f.write(f"\n## Notes\n\nCommand: `{argv_desc}`. Implementations: see the docstring of "
                "bench/bench_fused_linear.py.\n\n")
        f.write("\n".join(note_lines) + ("\n" if note_lines else "- every implementation ran\n"))
    try:
        plot(rows, base + ".png")
    except Exception as e:  # noqa: BLE001 - the tables matter more than the plot
        print(f"plot not written: {type(e).__name__}: {e}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    isas = {r.get("isa") for r in rows}
    levels = [lv for lv in ("avx512", "avx2", "default") if lv in isas] or [None]
    styles = ["-", ":", "-."]
    sel = [r for r in rows if r["mode"] == "fwd+bwd"]
    colors = {}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row_i, fam in enumerate(("lp", "grpo")):
        impls = ["gemms"] + sorted({r["impl"] for r in rows if _family(r["impl"]) == fam})
        for impl in impls:
            label = impl if impl == "gemms" else impl.split("/", 1)[1]
            color = "black" if impl == "gemms" else colors.setdefault(label, f"C{len(colors)}")
            for li, level in enumerate(levels):
                pts = sorted((r["V"], r["ms"], r["peak_extra_MiB"]) for r in sel
                             if r["impl"] == impl and r.get("isa") == level)
                if not pts:
                    continue
                kw = dict(color=color, linestyle="--" if impl == "gemms" and li == 0 else styles[li],
                          marker="o" if li == 0 else "x", label=label if li == 0 else None)
                axes[row_i, 0].plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], **kw)
                axes[row_i, 1].plot([p[0] for p in pts], [p[2] / 1024 for p in pts], **kw)
            missing = sorted({r["V"] for r in rows if r["impl"] == impl} - {r["V"] for r in sel if r["impl"] == impl})
            if missing:
                axes[row_i, 1].annotate(f"{label}: no fwd+bwd row at V={', '.join(map(str, missing))} (notes)",
                                        xy=(0.02, 0.02), xycoords="axes fraction", fontsize=7)
        title = "log-probs + entropy" if fam == "lp" else "GRPO loss"
        axes[row_i, 0].set_title(f"{title}: fwd+bwd time")
        axes[row_i, 0].set_ylabel("seconds")
        axes[row_i, 1].set_title(f"{title}: peak extra memory")
        axes[row_i, 1].set_ylabel("GiB")
        axes[row_i, 1].set_yscale("log")
        for ax in axes[row_i]:
            ax.set_xlabel("V (vocabulary)")
            ax.grid(True, alpha=0.3)
            if len(levels) > 1:
                for li, level in enumerate(levels):
                    ax.plot([], [], color="grey", linestyle=styles[li], marker="o" if li == 0 else "x", label=level)
            ax.legend(fontsize=7)
    shape = sel[0] if sel else {}
    fig.suptitle(f"fused lm_head, N={shape.get('N')} H={shape.get('H')} {shape.get('dtype')}, forward + backward"
                 f"\n{machine_description()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    child = "--rows-to" in args
    own_notes = None
    if not child and NOTES_ENV not in os.environ:
        own_notes = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False)
        own_notes.close()
        os.environ[NOTES_ENV] = own_notes.name
    try:
        rows = bench_main("fused_linear", __doc__, cases_for, argv, reps=5, baseline="gemms")
        if not child and rows is not None:
            with open(os.environ[NOTES_ENV]) as f:
                notes = [json.loads(line) for line in f if line.strip()]
            write_extras(rows, notes, " ".join(["python -m bench.bench_fused_linear", *args]), out_dir_of(args))
        return rows
    finally:
        if own_notes is not None:
            os.environ.pop(NOTES_ENV, None)
            os.unlink(own_notes.name)


if __name__ == "__main__":
    main()
