"""The CPU kernels at every ISA level this machine supports, chosen at load, against float64.

Each level runs in its own process (the level is chosen once, when alignops._C is imported),
forced through ALIGNOPS_CPU_ISA or torch's own ATEN_CPU_CAPABILITY. The child computes its float64
oracle with plain torch math on the same rounded inputs and prints the worst errors as JSON.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from alignops import _backend

LEVELS = _backend.ISA_LEVELS
pytestmark = pytest.mark.skipif(_backend.load_c() is None, reason="alignops._C not built")


def _machine_level() -> str:
    # in a clean process: this one may carry ATEN_CPU_CAPABILITY from the environment
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
    return out if out in LEVELS else "default"


MACHINE = _machine_level()
SUPPORTED = [lv for lv in LEVELS if LEVELS.index(lv) <= LEVELS.index(MACHINE)]

CHILD = r"""
import json, math, sys
import torch
import alignops as ao
from alignops import _backend

torch.manual_seed(0)
result = {"isa": _backend.cpu_isa()}
worst = {}

def err(name, got, want, scale=1.0):
    e = float(((got.detach().double() - want).abs() / scale).max()) if got.numel() else 0.0
    worst[name] = max(worst.get(name, 0.0), e)

def oracle(x, y, T, w_logp, w_ent, ignore):
    z = x.double() / T
    lsm = torch.log_softmax(z, -1)
    p = lsm.exp()
    logp = lsm.gather(-1, y.clamp(min=0)[:, None])[:, 0]
    ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)
    keep = y != ignore
    logp, ent = torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)
    onehot = torch.zeros_like(z).scatter_(-1, y.clamp(min=0)[:, None], 1.0)
    # d(w_logp logp + w_ent H)/dx, by hand: softmax Jacobian, then 1/T
    g = w_logp[:, None] * (onehot - p) - w_ent[:, None] * p * (torch.where(p > 0, lsm, 0.0) + ent[:, None])
    g = torch.where(keep[:, None], g / T, 0.0)
    return logp, ent, g

for V in (1031, 4099):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        n = 24
        x = torch.randn(n, V) * 3
        x[0, 7] += 40.0                       # peaked row
        x[1, :] += 1000.0                     # shifted row
        x[2, ::5] = -float("inf")             # p = 0 entries
        x = x.to(dtype)
        y = torch.randint(0, V, (n,))
        y[2] = 1                              # a finite logit in the -inf row
        y[3] = -100                           # ignored row
        T = 0.7
        w_logp, w_ent = torch.randn(n), torch.randn(n)
        xr = x.clone().requires_grad_(True)
        logp, ent = ao.token_logprobs(xr, y, temperature=T, compute_entropy=True, backend="cpu")
        (logp * w_logp + ent * w_ent).sum().backward()
        o_logp, o_ent, o_g = oracle(x, y, T, w_logp.double(), w_ent.double(), -100)
        tag = str(dtype).replace("torch.", "")
        err(f"logp/{tag}", logp, o_logp, 1.0 + o_logp.abs())
        err(f"entropy/{tag}", ent, o_ent, 1.0 + o_ent.abs())
        # relative to the row's largest gradient: the gradient is stored in the logits' dtype
        err(f"grad/{tag}", xr.grad, o_g, o_g.abs().max(-1, keepdim=True).values + 1e-30)

# the one-launch policy loss (grad in forward) against the same loss on float64 logits
B, Tn, V = 3, 5, 1031
x = (torch.randn(B, Tn, V) * 2)
y = torch.randint(0, V, (B, Tn)); y[1, 3:] = -100
old = torch.randn(B, Tn) * 0.1 - 7.0
adv = torch.randn(B)
xr = x.clone().requires_grad_(True)
out = ao.fused_policy_loss(xr, y, old, adv, method="grpo", temperature=0.8, backend="cpu",
                           grad_in_forward=True, entropy_coef=0.01)
out.loss.backward()
x64 = x.double().requires_grad_(True)
ref = ao.fused_policy_loss(x64, y, old.double(), adv.double(), method="grpo", temperature=0.8,
                           backend="torch", entropy_coef=0.01)
ref.loss.backward()
err("policy/loss", out.loss.detach().reshape(1), ref.loss.detach().reshape(1), 1.0 + ref.loss.abs())
err("policy/grad", xr.grad, x64.grad, x64.grad.abs().max() + 1e-30)

# advantage kernels
r = torch.randn(64, dtype=torch.float32); r[8:16] = 0.5     # one zero-variance group
a = ao.grpo_advantages(r, group_size=8, backend="cpu")
a = a.advantages if hasattr(a, "advantages") else a
g = r.double().view(8, 8)
want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
err("grpo_advantages", a, want)
xw = torch.randn(6, 50); m = torch.rand(6, 50) > 0.3
w = ao.masked_whiten(xw, m, backend="cpu")
sel = xw.double()[m]
want = (xw.double() - sel.mean()) / (sel.var(unbiased=True) + 1e-8).sqrt()
err("masked_whiten", w[m], want[m])
result["worst"] = worst
print(json.dumps(result))
"""


def _run(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ALIGNOPS_CPU_ISA", "ATEN_CPU_CAPABILITY", "TRITON_INTERPRET", "ALIGNOPS_BACKEND")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# fp32 within 1e-5 relative (docs/design.md); a gradient stored in bf16/fp16 within twice its dtype's
# epsilon of the row's largest entry (the storage rounding alone is half an epsilon)
TOLERANCE = {"logp": 2e-5, "entropy": 2e-5, "grad/float32": 1e-5,
             "grad/bfloat16": 2 * torch.finfo(torch.bfloat16).eps, "grad/float16": 2 * torch.finfo(torch.float16).eps, "policy/loss": 1e-5, "policy/grad": 1e-5,
             "grpo_advantages": 1e-5, "masked_whiten": 1e-5}


def _check(worst: dict):
    assert worst, "the child computed nothing"
    for name, e in worst.items():
        tol = TOLERANCE.get(name, TOLERANCE.get(name.split("/")[0]))
        assert e <= tol, f"{name}: error {e:.3g} above {tol:g}"


def test_every_compiled_level_is_built():
    info = _backend.cpu_isa()
    import platform
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert info["compiled"] == ["default", "avx2", "avx512"]
    else:
        assert info["compiled"] == ["default"]
    assert info["chosen"] == MACHINE or os.environ.get("ALIGNOPS_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY")


@pytest.mark.parametrize("level", SUPPORTED)
def test_level_forced_by_alignops_env_matches_float64(level):
    res = _run({"ALIGNOPS_CPU_ISA": level})
    assert res["isa"]["chosen"] == level and res["isa"]["error"] is None
    _check(res["worst"])


@pytest.mark.parametrize("level", SUPPORTED)
def test_level_follows_torch_capability(level):
    # ATEN_CPU_CAPABILITY lowers torch's own kernels; alignops follows it
    res = _run({"ATEN_CPU_CAPABILITY": level})
    assert res["isa"]["chosen"] == level and res["isa"]["torch_cpu_capability"].lower() == level
    _check(res["worst"])


def test_alignops_env_cannot_raise_the_level():
    if MACHINE == "default":
        pytest.skip("needs a CPU with at least AVX2 to lower torch below avx512")
    below = SUPPORTED[-2]
    code = ("import warnings, json\nwarnings.simplefilter('always')\n"
            "from alignops import _backend\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    _backend.load_c()\n"
            "print(json.dumps({'isa': _backend.cpu_isa(), 'warnings': [str(x.message) for x in w]}))")
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNOPS_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env.update({"ATEN_CPU_CAPABILITY": below, "ALIGNOPS_CPU_ISA": "avx512"})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["isa"]["chosen"] == below
    assert any("can only lower" in w and "ALIGNOPS_CPU_ISA=avx512" in w for w in res["warnings"]), res


def test_bad_alignops_cpu_isa_is_a_clear_error():
    code = ("import torch, alignops as ao\n"
            "try:\n"
            "    ao.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend='cpu')\n"
            "except ao.BackendUnavailableError as e:\n"
            "    print('ERR', e)\n")
    env = dict(os.environ, ALIGNOPS_CPU_ISA="sse9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "ERR" in out and "ALIGNOPS_CPU_ISA" in out and "sse9" in out


def _instructions(path: str) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_libraries_hold_only_their_levels_instructions():
    """What a library may execute is what it was compiled for: the default level and the bindings
    hold no AVX register at all, the AVX2 level no AVX-512 one (an AVX-512 build must not die with
    SIGILL on an AVX2 machine)."""
    import glob

    import alignops
    here = os.path.dirname(alignops.__file__)

    def lib(name):
        found = glob.glob(os.path.join(here, f"{name}.*.so")) + glob.glob(os.path.join(here, f"{name}.so"))
        assert found, f"{name} not found in {here}"
        return found[0]

    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 register names")
    for name, banned in (("_C", ("%ymm", "%zmm")), ("_cpu_default", ("%ymm", "%zmm")),
                         ("_cpu_avx2", ("%zmm",))):
        text = _instructions(lib(name))
        for reg in banned:
            assert reg not in text, f"{name} uses {reg} registers"
    assert "%ymm" in _instructions(lib("_cpu_avx2"))      # the check sees vector code at all
    assert "%zmm" in _instructions(lib("_cpu_avx512"))
