"""bench/gpu_compile_check.py compiles the Triton kernels for sm_80/sm_90 without a GPU: a real
kernel variant compiles with sane resources, and the check fails on kernels the GPU compiler
rejects (which the interpreter, what the other tests run, accepts) or that spill.

The check runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process, and
triton.compile does not work in an interpreted process)."""

import csv
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import checkout_root  # noqa: E402

pytest.importorskip("triton")

ROOT = checkout_root(module_level=True)  # runs bench/gpu_compile_check.py

from bench import gpu_compile_check as gcc  # noqa: E402  (stdlib only at import: no triton, no torch)


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_compile_check", "--jobs", "1", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    [csv_path] = out.glob("gpu-compile-check*.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return proc, rows


def test_real_kernel_variants_compile_with_sane_resources(tmp_path):
    proc, rows = _run(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {r["kernel"] for r in rows}
    assert {"_token_stats_fwd_kernel", "_token_stats_bwd_kernel", "_policy_loss_fused_kernel"} <= kernels
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["ok"] == "ok", r
        regs, nw = int(r["regs"]), int(r["num_warps"])
        assert 0 < regs <= 255, r
        assert regs * nw * 32 <= 65536, r
        assert int(r["spills"]) == 0 and int(r["stack"]) == 0, r
        assert 0 <= int(r["shared_dyn"]) + int(r["shared_static"]) <= gcc.SHARED_LIMIT[int(r["arch"][3:])], r
    fwd = [r for r in rows if r["kernel"] == "_token_stats_fwd_kernel"]
    # The production tile of _launch_config (V = 151936): BLOCK_V 8192, 16 warps.
    assert any("BLOCK_V=8192" in r["variant"] and r["num_warps"] == "16" for r in fwd), fwd


BAD_KERNELS = textwrap.dedent('''
    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def good_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


    @triton.jit
    def dot_k8(a_ptr, c_ptr, B: tl.constexpr):
        r = tl.arange(0, B)
        a = tl.load(a_ptr + r[:, None] * B + r[None, :])
        tl.store(c_ptr + r[:, None] * B + r[None, :], tl.dot(a, a).to(tl.float16))


    @triton.jit
    def carried_scalar(x_ptr, n, B: tl.constexpr):
        acc = 0.0
        for i in range(0, n, B):
            acc += tl.load(x_ptr + i + tl.arange(0, B))  # a scalar that becomes a block
        tl.store(x_ptr, tl.sum(acc, 0))


    @triton.jit
    def fp8_e4m3(x_ptr, B: tl.constexpr):
        r = tl.arange(0, B)
        tl.store(x_ptr + r, tl.load(x_ptr + r).to(tl.float8e4nv).to(tl.float32))


    @triton.jit
    def spilling(x_ptr, B: tl.constexpr):
        r = tl.arange(0, B)
        x = tl.load(x_ptr + r)
        s = tl.sum(tl.exp(x), 0)
        tl.store(x_ptr + r, x / s)


    def _m(n, dt=torch.float32):
        return torch.empty(n, dtype=dt, device="meta")


    def gpu_compile_cases():
        return [
            ("good", lambda: good_copy[(4,)](_m(4096), _m(4096), 4096, BLOCK=1024, num_warps=4)),
            ("dot 8x8x8 fp16", lambda: dot_k8[(1,)](_m(64, torch.float16), _m(64, torch.float16), B=8)),
            ("carried", lambda: carried_scalar[(1,)](_m(4096), 4096, B=128)),
            ("fp8", lambda: fp8_e4m3[(1,)](_m(128), B=128)),
            ("8192 fp32 per warp", lambda: spilling[(1,)](_m(8192), B=8192, num_warps=1)),
        ]
''')


def test_check_fails_on_kernels_the_gpu_compiler_rejects(tmp_path):
    mod = tmp_path / "bad_kernels.py"
    mod.write_text(BAD_KERNELS)
    proc, rows = _run(tmp_path, "--only-extra", "--module", str(mod))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    by = {(r["kernel"], r["arch"]): r for r in rows}
    assert len(by) == 10, sorted(by)
    for arch in ("sm_80", "sm_90"):
        good = by[("good_copy", arch)]
        assert good["ok"] == "ok" and int(good["regs"]) > 0, good
        assert "K >= 16" in by[("dot_k8", arch)]["ok"], by[("dot_k8", arch)]
        assert "Loop-carried variable" in by[("carried_scalar", arch)]["ok"], by[("carried_scalar", arch)]
        assert "spills" in by[("spilling", arch)]["ok"] and int(by[("spilling", arch)]["stack"]) > 0
    # fp8e4nv: rejected on sm_80 only
    assert "compile error" in by[("fp8_e4m3", "sm_80")]["ok"] and "fp8e4nv" in by[("fp8_e4m3", "sm_80")]["ok"]
    assert by[("fp8_e4m3", "sm_90")]["ok"] == "ok"
    # the failure names kernel, variant and arch
    assert "FAIL kernel=dot_k8 arch=sm_80" in proc.stderr and "variant=[" in proc.stderr


def _result(**kw):
    base = dict(kernel="k", variant="v", arch=90, num_warps=16, regs=64, stack=0, local=0, spill_stores=0,
                spill_loads=0, dynamic_shared=0, static_shared=0, error=None)
    base.update(kw)
    return base


def test_judge_limits():
    assert gcc.judge(_result()) == []
    # 130 registers allocate as 136: 136 x 512 threads > 65536
    assert "registers" in gcc.judge(_result(regs=130))[0]
    assert gcc.judge(_result(regs=128)) == []
    assert "shared memory" in gcc.judge(_result(arch=80, dynamic_shared=166912, static_shared=1))[0]
    assert gcc.judge(_result(arch=90, dynamic_shared=166913)) == []
    assert "spills" in gcc.judge(_result(stack=8, spill_stores=4, spill_loads=4))[0]
    assert gcc.judge(_result(error="CompilationError: boom"))[0].startswith("compile error")


def test_allowed_spills_are_per_variant_version_and_size():
    listed = dict(kernel="_gae_scan_kernel", arch=80, num_warps=4, variant="ptr fp64/i64/u8; GAMMA=1; F64; BLOCK=1024",
                  stack=8, spill_stores=4, spill_loads=4)
    assert gcc.judge(_result(**listed, triton="3.6.0")) == []
    assert "spills" in gcc.judge(_result(**listed, triton="3.9.0"))[0]          # listed for triton 3.6.0 only
    assert "spills" in gcc.judge(_result(**{**listed, "stack": 16}, triton="3.6.0"))[0]   # larger than allowed
    assert "spills" in gcc.judge(_result(**{**listed, "num_warps": 8}, triton="3.6.0"))[0]  # another variant
    any_version = dict(kernel="_gae_scan_kernel", arch=80, num_warps=4, variant="F64; BLOCK=256", stack=8,
                       spill_stores=4, spill_loads=4)
    assert gcc.judge(_result(**any_version, triton="3.9.0")) == []


def test_fingerprint_follows_source_specialisation_and_version(tmp_path, monkeypatch):
    (tmp_path / "helpers.py").write_text("H = 1\n")
    (tmp_path / "mod.py").write_text("from .helpers import H\n")
    monkeypatch.setattr(gcc, "KERNELS_DIR", tmp_path)
    task = dict(module="alignops.kernels.mod", kernel="k", arch=90, signature={"x": "*fp32"}, constexprs={(1,): 4},
                attrs={(0,): [["tt.divisibility", 16]]},
                options={"num_warps": 4, "extern_libs": (("libdevice", "/a/site-packages/triton/libdevice.10.bc"),)})
    base = gcc.fingerprint(task, "3.9.0")
    moved = dict(task, options={"num_warps": 4, "extern_libs": (("libdevice", "/elsewhere/libdevice.10.bc"),)})
    assert gcc.fingerprint(moved, "3.9.0") == base                               # a clone elsewhere agrees
    assert gcc.fingerprint(task, "3.6.0") != base
    assert gcc.fingerprint(dict(task, constexprs={(1,): 8}), "3.9.0") != base
    assert gcc.fingerprint(dict(task, arch=80), "3.9.0") != base
    (tmp_path / "helpers.py").write_text("H = 2\n")                             # an imported kernels module
    assert gcc.fingerprint(task, "3.9.0") != base
