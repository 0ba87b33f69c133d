"""Threads that make the first calls of a process together, on CPU tensors.

What is loaded lazily on the first call (alignops._backend: load_c imports alignops._C, whose
import picks the CPU ISA level and opens that library, csrc/cpu_isa.cpp; the kernel table
_KERNEL_CACHE; the warn-once set of the automatic backend choice) is loaded while several threads
wait on it. Each case is a fresh Python process (a subprocess) that imports alignops, checks that no
op has run and alignops._C is not loaded yet, and starts its threads behind a barrier so that they
enter their first call together. After the threads join, the main thread checks every thread's
result: bitwise equal to the same call made again single-threaded, and within the fp32 rule
(1e-5 of the output's scale) of float64 math written here, plain torch on the same inputs.

Two knobs make the interleaving likely rather than lucky: the interpreter switches threads every
microsecond (sys.setswitchinterval) instead of every 5 ms, and with `slow_import` finding
alignops._C on disk takes 0.2 s (a slow or network filesystem), so the other threads reach the
kernels while one is still loading them. Before the fix in _backend.load_c (a lock, and `_c_tried`
set only once the state is final) the other threads read "no module, no error" in that window:
`backend="cpu"` raised BackendUnavailableError(None), and the automatic choice picked the cpu
backend over a library that had failed to load (a RuntimeError from the kernel instead of the
documented fallback warning).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignops import _backend


# The child process. argv: slow_import (0/1), the threads' cases (comma-separated). Prints one JSON line.
CHILD = r'''
import json, math, sys, threading, time, warnings
slow = sys.argv[1] == "1"
sys.setswitchinterval(1e-6)

class SlowFinder:
    """Finding alignops._C takes 0.2 s (then the normal finders find it)."""
    def find_spec(self, name, path=None, target=None):
        if slow and name == "alignops._C":
            time.sleep(0.2)
        return None

sys.meta_path.insert(0, SlowFinder())
import torch
import torch._dynamo  # as in any process that compiles: the first op call does not import it
import alignops as ao
from alignops import _backend
assert "alignops._C" not in sys.modules and not _backend._c_tried, "not a cold start"

g = torch.Generator().manual_seed(0)
N, V, TEMP = 12, 1009, 0.8
x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).float()
y = torch.randint(0, V, (N,), generator=g)
y[3] = -100
wl = torch.randn(N, generator=g)       # upstream gradients of logp and entropy
we = torch.randn(N, generator=g)
cu = torch.tensor([0, 5, 12])          # two packed rows
old = torch.randn(N, generator=g).mul(0.1).add(-7.0)
adv = torch.randn(2, generator=g)
NORM = 11.0

def tl(backend):
    xx = x.clone().requires_grad_()
    lp, ent = ao.token_logprobs(xx, y, temperature=TEMP, compute_entropy=True, backend=backend)
    ((lp * wl).sum() + (ent * we).sum()).backward()
    return [lp.detach(), ent.detach(), xx.grad]

def pl(backend, grad_in_forward):
    xx = x.clone().requires_grad_()
    out = ao.fused_policy_loss(xx, y, old, adv, cu_seqlens=cu, method="grpo", temperature=TEMP,
                               normalizer=NORM, grad_in_forward=grad_in_forward, backend=backend)
    out.loss.backward()
    return [out.loss.detach().reshape(1), xx.grad]

def oracle_tl():
    """float64: logp, entropy and d(sum wl*logp + we*H)/dx by autograd."""
    z = x.double().requires_grad_()
    ls = torch.log_softmax(z / TEMP, -1)
    valid = y != -100
    lp = torch.where(valid, ls.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(ls.exp() * ls).sum(-1), 0.0)
    ((lp * wl.double()).sum() + (ent * we.double()).sum()).backward()
    return [lp.detach(), ent.detach(), z.grad]

def oracle_pl():
    """float64 GRPO, token-mean over the step's NORM tokens: -sum min(r A, clip(r, 0.8, 1.2) A) / NORM."""
    z = x.double().requires_grad_()
    valid = y != -100
    lp = torch.log_softmax(z / TEMP, -1).gather(1, y.clamp(min=0)[:, None])[:, 0]
    a = adv.double().repeat_interleave(cu.diff())
    r = torch.exp(lp - old.double())
    phi = -torch.minimum(r * a, r.clamp(0.8, 1.2) * a)
    loss = torch.where(valid, phi, 0.0).sum() / NORM
    loss.backward()
    return [loss.detach().reshape(1), z.grad]

CASES = sys.argv[2].split(",")
CALLS = {
    "cpu": lambda: tl("cpu"), "torch": lambda: tl("torch"), "auto": lambda: tl(None),
    "policy_one_launch": lambda: pl("cpu", True), "policy_autograd": lambda: pl(None, False),
    "auto_torch": lambda: tl(None), "auto_policy": lambda: pl(None, True),
}
ORACLE = {"cpu": oracle_tl, "torch": oracle_tl, "auto": oracle_tl, "auto_torch": oracle_tl,
          "policy_one_launch": oracle_pl, "policy_autograd": oracle_pl, "auto_policy": oracle_pl}

barrier = threading.Barrier(len(CASES))
results = [None] * len(CASES)

def work(i):
    barrier.wait()
    try:
        results[i] = CALLS[CASES[i]]()
    except BaseException as e:  # reported, not swallowed: the parent fails on it
        results[i] = f"{type(e).__name__}: {e}"

with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n_warned = len(record)
    again = {c: CALLS[c]() for c in set(CASES)}   # single-threaded, after the threads
report = {"warnings": [f"{w.category.__name__}: {w.message}" for w in record[:n_warned]],
          "warnings_after": [str(w.message) for w in record[n_warned:]], "threads": [], "cpu_isa": _backend.cpu_isa()}
for case, got in zip(CASES, results):
    entry = {"case": case}
    if isinstance(got, str):
        entry["error"] = got
    else:
        want = ORACLE[case]()
        entry["bitwise_as_single_thread"] = all(torch.equal(a, b) for a, b in zip(got, again[case]))
        errs = []
        for a, b in zip(got, want):
            scale = max(1.0, b.abs().max().item())
            errs.append((a.double() - b).abs().max().item() / scale)
        entry["max_err_over_scale"] = max(errs)
    report["threads"].append(entry)
print(json.dumps(report))
'''


def run_child(cases: list[str], slow_import: bool, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ALIGNOPS_BACKEND", "ALIGNOPS_CPU_ISA", "TRITON_INTERPRET")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", CHILD, "1" if slow_import else "0", ",".join(cases)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"the child process died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_threads(report: dict) -> None:
    for entry in report["threads"]:
        assert "error" not in entry, f"thread running {entry['case']} failed: {entry['error']}"
        assert entry["bitwise_as_single_thread"], f"{entry['case']}: differs from the single-threaded call"
        assert entry["max_err_over_scale"] <= 1e-5, entry


needs_cpu = pytest.mark.skipif(_backend.cpu_error() is not None, reason="the CPU kernels are not built here")


@needs_cpu
def test_first_calls_from_threads():
    """token_logprobs on cpu (two threads), torch and automatic (cpu), fused_policy_loss by the
    one-launch kernel and by autograd: all from a cold import at once, all correct, no warning.
    (Without the slow import the old race showed in some runs only: 0 of 2 here, against 2 of 2
    with it; each process costs ~6 s, so only the deterministic one is run.)"""
    cases = ["cpu", "cpu", "torch", "auto", "policy_one_launch", "policy_autograd"]
    report = run_child(cases, slow_import=True)
    check_threads(report)
    assert report["cpu_isa"]["chosen"] and report["cpu_isa"]["error"] is None, report["cpu_isa"]
    assert report["warnings"] == [], report["warnings"]


@needs_cpu
def test_automatic_fallback_warns_once_across_threads():
    """The CPU kernels fail to load (ALIGNOPS_CPU_ISA names no level): every thread's automatic
    choice falls back to torch with a correct result, and the process warns exactly once, naming
    the cause (docs/backends.md: one RuntimeWarning per cause), however many threads met it at once;
    calls made afterwards warn no more."""
    cases = ["auto_torch"] * 4 + ["auto_policy"] * 2
    report = run_child(cases, slow_import=True, ALIGNOPS_CPU_ISA="bogus")
    check_threads(report)
    assert report["cpu_isa"]["chosen"] is None and "bogus" in report["cpu_isa"]["error"], report["cpu_isa"]
    warned = report["warnings"]
    assert len(warned) == 1, warned
    assert warned[0].startswith("RuntimeWarning: alignops:") and "falls back to the slow torch backend" in warned[0] \
        and "ALIGNOPS_CPU_ISA must be one of" in warned[0], warned
    assert report["warnings_after"] == [], report["warnings_after"]
