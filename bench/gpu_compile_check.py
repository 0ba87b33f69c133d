"""Ahead-of-time GPU compile check of every Triton kernel in kernels/*.py, on a machine without a GPU.

    python -m bench.gpu_compile_check            # full check: bench/results/gpu-compile-check-triton<version>.{md,csv}
                                                 # and the record of what passed, bench/results/gpu-compile-check.json
    python -m bench.gpu_compile_check --changed-only   # what `make test` runs: only the variants the record lacks
    python -m bench.gpu_compile_check --quick    # a small subset (the pytest wrapper), writes nothing

`make test` runs it twice, with the newest triton and with triton 3.6.0 (the oldest supported, the
GPU machines'). A full run that passes records one fingerprint per compiled variant and arch: the
source of the kernel's module (and of the kernels/ modules it imports), its specialisation (dtypes,
constexprs, int attributes, launch options) and the triton version. `--changed-only` compiles just
the variants whose fingerprint the record lacks, so an unchanged tree costs the collection only;
a changed kernel is compiled in `make test` and, once committed, recorded by a full run.

The Triton interpreter (TRITON_INTERPRET=1, what the CPU tests run) accepts programs the GPU compiler
rejects: a loop-carried scalar that becomes a block, tl.dot with K < 16, fp8e4nv on sm_80, a tile
that spills or overflows the register file. Triton compiles ahead of time without a driver
(triton.compile(ASTSource, target=GPUTarget("cuda", cc, 32)) runs the ptxas inside the wheel), so
this script compiles every kernel for sm_80 and sm_90 in the variants its launcher produces, and
reads the resources of each cubin.

How the variants are found (so the check follows the code):
- Every kernels/*.py module is imported; every @triton.jit function defined there and launched
  there (`name[grid](...)`) is a kernel, the other jit functions are helpers compiled inside them.
  A module without a driver below, or a kernel that no driver launch reaches, is a failure.
- A driver calls the module's *real launchers* on meta tensors (no memory, realistic shapes such
  as [2, 16384, 151936]), with each kernel temporarily replaced by a recorder. The recorder keeps
  the (args, kwargs) of each launch; they go through the kernel's own binder and
  JITFunction._pack_args (what a launch does), so dtypes, constexprs (BLOCK sizes, flags, method
  and KL codes), num_warps and the int/alignment specialisation (i32 vs i64, divisible by 16,
  value 1) are exactly those the launcher would compile. Launches with the same specialisation
  are compiled once.
- The drivers pick the launcher inputs: for the logits kernels one V per (BLOCK_V, num_warps)
  that _launch_config can return (the powers of two up to its 8192 cap) plus real vocabularies
  (32000, 50257, 151936: divisible by 16 or not, i64 batch stride), each dtype (fp32, fp16, bf16)
  and each flag; the policy kernel's flag space (4 methods x 5 KL codes x 5 flags x entropy) is
  covered by every method x KL code with all flags on, every method with all flags off, and each
  flag off on its own, at the production tile, plus the tile/dtype sweep with all flags on.
  INV_TEMP (a constexpr) is 1.0 and 1/0.7. The advantage kernels' block sizes are written inline
  in their launchers, so their drivers give inputs that reach each inline choice (gae_scan's
  16..1024 from the mean row length).

Checks, per kernel x variant x arch (any failure: exit status 1 and a line naming all three):
- it compiles (frontend, TTGIR, LLVM and ptxas);
- registers (ptxas' count, rounded up to the allocation unit of 8) x threads <= 65536;
- dynamic (Triton) + static shared memory <= the arch's per-block opt-in maximum
  (sm_80: 163 KiB = 166912 bytes, sm_90: 227 KiB = 232448 bytes);
- no stack frame and no spill stores/loads (ptxas -v) unless ALLOWED_SPILLS lists the variant
  with a reason.
Registers, stack and static shared memory are read from the cubin with the wheel's
`cuobjdump --dump-resource-usage`, spills from ptxas' own -v log, dynamic shared memory from the
compiled kernel's metadata (`n_regs`/`n_spills` exist only after a driver loads the binary).

The compile uses a fresh Triton cache directory so every variant really goes through ptxas, and
runs in a process without TRITON_INTERPRET (triton.compile does not work in an interpreted
process; the script re-executes itself when it finds the variable set).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KERNELS_DIR = ROOT / "kernels"

ARCHS = (80, 90)
# cudaDevAttrMaxSharedMemoryPerBlockOptin of A100 / H100 (what Triton checks at launch).
SHARED_LIMIT = {80: 166912, 90: 232448}
REGISTER_FILE = 65536  # 32-bit registers per SM and per block, sm_80 and sm_90
REG_UNIT = 8           # registers are allocated per thread in multiples of 8 (256 per warp)

# (kernel, arch, num_warps, variant substring, triton versions or None for any, reason): spills
# accepted for these variants only. Each entry is one 4-byte stack slot that ptxas uses at a
# register count far below the limit; `judge` still fails any other variant that spills, and any
# listed one whose spill or stack frame exceeds ALLOWED_SPILL_BYTES. Their cost on a GPU is still to
# be measured (no GPU has run these kernels yet).
ALLOWED_SPILL_BYTES = 8
_OLDEST = ("3.6.0",)
_HEAVIEST = "INV_TEMP=1.429; METHOD=0; KL=4"  # clip method, low_var_kl, every flag, temperature != 1
ALLOWED_SPILLS: list[tuple[str, int, int, str, tuple[str, ...] | None, str]] = [
    ("_token_stats_bwd_kernel", 90, 16, "HAS_ENTROPY_GRAD; BLOCK_V=8192", None,
     "fp16/bf16 logits, V not a multiple of 16: 8 B at 64 registers"),
    ("_gae_scan_kernel", 80, 4, "F64; BLOCK=256", None, "fp64 scan: 4 B"),
    ("_masked_moments_kernel", 90, 4, "ptr fp32/fp64/u8; BLOCK=4096", None, "fp32 input: 4 B at 128 registers"),
    # triton 3.6.0 (the GPU machines') allocates one more slot than the newest in these:
    ("_gae_scan_kernel", 80, 4, "F64; BLOCK=1024", _OLDEST, "fp64 scan: 4 B at 168 registers"),
    ("_policy_loss_fused_kernel", 80, 8, _HEAVIEST, _OLDEST, "the heaviest epilogue, fp16/bf16: 4 B at 48 registers"),
    ("_policy_loss_fused_kernel", 80, 16, _HEAVIEST, _OLDEST, "the heaviest epilogue, fp32: 4 B at 64 registers"),
    ("_policy_loss_fused_kernel", 90, 16, _HEAVIEST, _OLDEST, "the heaviest epilogue: 4 B at 40-64 registers"),
    ("_distill_fwd_kernel", 80, 16, "ptr bf16/fp32/u1; INV_TEMP=1.429; DIV=2", _OLDEST,
     "JSD's forward (two rows, a log per element), bf16, the largest tile: 4 B"),
]

INV_TEMPS = (1.0, 1.0 / 0.7)
DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------------
# recording launches


class _Recorder:
    """Stands in for a JITFunction inside its module: `kernel[grid](*args, **kwargs)` records."""

    def __init__(self, fn, sink, label_box):
        self.fn, self.sink, self.label_box = fn, sink, label_box

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, self.label_box[0], args, kwargs))
        return launch


def _jit_functions(mod):
    import triton  # noqa: PLC0415
    return {name: obj for name, obj in vars(mod).items()
            if isinstance(obj, triton.runtime.jit.JITFunction) and obj.fn.__module__ == mod.__name__}


def _launched_names(mod, jits) -> list[str]:
    src = Path(mod.__file__).read_text()
    return [name for name in jits if re.search(rf"\b{re.escape(name)}\s*\[", src)]


@contextlib.contextmanager
def _recording(mod, names, sink, label_box):
    saved = {n: getattr(mod, n) for n in names}
    try:
        for n in names:
            setattr(mod, n, _Recorder(saved[n], sink, label_box))
        yield
    finally:
        for n, fn in saved.items():
            setattr(mod, n, fn)


# --------------------------------------------------------------------------------------------
# drivers: the launcher inputs, per kernels module. Each yields (label, thunk); the thunk calls the
# module's launcher(s) on meta tensors.


def _meta(shape, dtype):
    import torch  # noqa: PLC0415
    return torch.empty(shape, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, device="meta")


def _logits_shapes(mod, quick: bool):
    """(B, T, V) per (BLOCK_V, num_warps) of mod._launch_config, then real vocabularies."""
    seen, shapes = set(), []
    for k in range(14):  # V = 1 .. 8192: every tile _launch_config returns below its cap
        v = 1 << k
        cfg = mod._launch_config(v)
        if cfg not in seen:
            seen.add(cfg)
            shapes.append((4, 1024, v))
    vocab = [(2, 16384, 151936)] if quick else [(4, 4096, 32000), (4, 2048, 50257), (2, 16384, 151936)]
    return shapes, vocab


def _drive_token_stats(mod, quick: bool):
    import torch  # noqa: PLC0415
    sweep, vocab = _logits_shapes(mod, quick)
    if quick:
        cases = [((2, 16384, 151936), "bfloat16", True, 1.0)]
    else:
        cases = []
        for shape in sweep:  # the tile sweep: every dtype, entropy on, a temperature != 1
            cases += [(shape, dt, True, INV_TEMPS[1]) for dt in DTYPES]
        for shape in vocab:  # real vocabularies: every dtype x flag x temperature
            cases += [(shape, dt, flag, it) for dt in DTYPES for flag in (True, False) for it in INV_TEMPS]
    for (B, T, V), dt, flag, inv_t in cases:
        def fwd(B=B, T=T, V=V, dt=dt, flag=flag, inv_t=inv_t):
            n = B * T
            rows = [_meta(n, torch.float32) for _ in range(3)]
            mod.token_stats_fwd(_meta((B, T, V), dt), _meta(n, torch.int64), inv_t, -100, flag, *rows)

        def bwd(B=B, T=T, V=V, dt=dt, flag=flag, inv_t=inv_t):
            n = B * T
            logits = _meta((B, T, V), dt)
            f = [_meta(n, torch.float32) for _ in range(5)]
            mod.token_stats_bwd(logits, _meta(n, torch.int64), f[0], f[1], f[2], f[3], f[4] if flag else None,
                                inv_t, -100, flag, _meta((B, T, V), dt))
        label = f"[{B},{T},{V}] {dt} T={1 / inv_t:.3g}"
        yield f"fwd {label} entropy={flag}", fwd
        yield f"bwd {label} entropy_grad={flag}", bwd


def _drive_policy_loss(mod, quick: bool):
    import torch  # noqa: PLC0415
    from alignops.policy.kernel_abi import KL_CODES, METHOD_CODES, OPTIONAL_KNOBS, pack  # noqa: PLC0415
    sweep, vocab = _logits_shapes(mod, quick)
    prod = (2, 16384, 151936)
    clip, gppo = METHOD_CODES["clip"], METHOD_CODES["gppo"]
    low_var = KL_CODES["low_var_kl"]
    # every optional input and knob on; early_shift exists for the clip code only (token-level ECPO)
    all_on = ("has_old", "has_is_weight") + OPTIONAL_KNOBS
    not_clip = tuple(f for f in all_on if f != "early_shift")
    # (method, kl, flags, entropy: "off" | "metric" | "coef")
    combos = []
    if quick:
        combos.append((prod, "bfloat16", clip, KL_CODES["k3"], all_on, "coef", 1.0))
    else:
        for method in METHOD_CODES.values():
            for kl in KL_CODES.values():  # every method x KL code, every flag on
                flags = all_on if method == clip else not_clip
                combos.append((prod, "bfloat16", method, kl, flags, "coef", 1.0))
            combos.append((prod, "bfloat16", method, KL_CODES["none"], (), "off", 1.0))  # plainest
        for drop in all_on:  # each flag off on its own
            combos.append((prod, "bfloat16", clip, KL_CODES["k3"], tuple(f for f in all_on if f != drop), "coef", 1.0))
        combos.append((prod, "bfloat16", clip, KL_CODES["k3"], all_on, "metric", 1.0))
        combos.append((prod, "bfloat16", clip, KL_CODES["k3"], all_on, "off", 1.0))
        for shape in sweep + vocab:  # tile x dtype sweep, heaviest epilogue
            for dt in DTYPES:
                combos.append((shape, dt, clip, low_var, all_on, "coef", INV_TEMPS[1]))
        for shape in vocab:
            combos.append((shape, "float32", gppo, KL_CODES["k3"], not_clip, "metric", 1.0))
    values = {"clip_lo": 0.8, "clip_hi": 1.28, "dual_clip": 3.0, "log_clamp": 20.0, "early_shift": 0.3,
              "gppo_k_low": -0.8, "gppo_k_high": -1.28, "scale": 1.0}
    for (B, T, V), dt, method, kl, flags, ent, inv_t in combos:
        def launch(B=B, T=T, V=V, dt=dt, method=method, kl=kl, flags=flags, ent=ent, inv_t=inv_t):
            n = B * T
            f32 = [_meta(n, torch.float32) for _ in range(10)]
            knobs = {k: v for k, v in values.items() if k not in OPTIONAL_KNOBS or k in flags}
            knobs.update(kl_coef=0.05 if kl else 0.0, entropy_coef=0.01 if ent == "coef" else 0.0)
            knob_list, bits = pack(knobs, has_old="has_old" in flags, has_ref=kl != KL_CODES["none"],
                                   has_is_weight="has_is_weight" in flags)
            mod.policy_loss_fused(_meta((B, T, V), dt), _meta(n, torch.int64), f32[0], f32[1], f32[2], f32[3],
                                  f32[4], f32[5], _meta(n, torch.bool), method, kl, knob_list, bits, inv_t, -100,
                                  ent != "off", f32[6], f32[7], f32[8], f32[9], _meta((B, T, V), dt))
        yield (f"[{B},{T},{V}] {dt} method={method} kl={kl} flags={'+'.join(flags) or '-'} entropy={ent} "
               f"T={1 / inv_t:.3g}"), launch


def _drive_advantages(mod, quick: bool):
    import torch  # noqa: PLC0415
    dts = ("float32",) if quick else ("float32", "float64")
    for dt in dts:
        for mode in ((1,) if quick else (0, 1, 2)):
            for raw in ((False,) if quick else (False, True)):
                def groups(dt=dt, mode=mode, raw=raw, p=512):
                    r = _meta(4096, dt)
                    outs = [_meta(p, dt) for _ in range(3)]
                    mod.group_advantages(r, _meta(4096, torch.int64), _meta(p + 1, torch.int64), mode, 1e-6, raw,
                                         _meta(4096, dt), *outs)
                yield f"group_advantages {dt} mode={mode} singleton_raw={raw}", groups
        for n in ((1 << 20,) if quick else (1 << 20, 1_000_003)):
            def moments(dt=dt, n=n):
                mod.masked_moments(_meta(n, dt), _meta(n, torch.bool), _meta(3, torch.float64))
            yield f"masked_moments {dt} n={n}", moments
            for shift in ((False,) if quick else (False, True)):
                def whiten(dt=dt, n=n, shift=shift):
                    mod.whiten_apply(_meta(n, dt), _meta(n, torch.bool), _meta(2, torch.float64), shift, _meta(n, dt))
                yield f"whiten_apply {dt} n={n} shift_back={shift}", whiten
        for length in ((1024,) if quick else (16, 32, 64, 128, 256, 512, 1024)):
            for gamma in ((1.0,) if quick else (1.0, 0.99)):
                def gae(dt=dt, length=length, gamma=gamma, rows=64):
                    n = rows * length
                    mod.gae_scan(_meta(n, dt), _meta(n, dt), _meta(n, torch.bool), _meta(rows + 1, torch.int64),
                                 gamma, _meta(rows, dt), _meta(rows, dt), _meta(n, dt), _meta(n, dt))
                yield f"gae_scan {dt} row_len={length} gamma={gamma}", gae


def _drive_distill(mod, quick: bool):
    """Forward and backward: JSD (the heaviest epilogue: a log per element) over the tile sweep in fp32
    and bf16, and every divergence x dtype at Qwen's vocabulary (T != 1)."""
    import torch  # noqa: PLC0415
    sweep, vocab = _logits_shapes(mod, quick)
    if quick:
        cases = [((2, 16384, 151936), "bfloat16", 2, 1.0)]
    else:
        cases = [(shape, dt, 2, INV_TEMPS[1]) for shape in sweep for dt in ("float32", "bfloat16")]
        cases += [((2, 16384, 151936), dt, div, INV_TEMPS[1]) for dt in DTYPES for div in (0, 1, 2)]
    for (B, T, V), dt, div, inv_t in cases:
        def fwd(B=B, T=T, V=V, dt=dt, div=div, inv_t=inv_t):
            n = B * T
            mod.distill_fwd(_meta((B, T, V), dt), _meta((B, T, V), dt), _meta(n, torch.bool), inv_t, div, 0.5,
                            _meta(n, torch.float32), _meta(5 * n, torch.float32))

        def bwd(B=B, T=T, V=V, dt=dt, div=div, inv_t=inv_t):
            n = B * T
            mod.distill_bwd(_meta((B, T, V), dt), _meta((B, T, V), dt), _meta(n, torch.bool),
                            _meta(5 * n, torch.float32), _meta(n, torch.float32), inv_t, div, 0.5,
                            _meta((B, T, V), dt))
        label = f"[{B},{T},{V}] {dt} divergence={div} T={1 / inv_t:.3g}"
        yield f"fwd {label}", fwd
        yield f"bwd {label}", bwd


DRIVERS = {"token_stats": _drive_token_stats, "policy_loss": _drive_policy_loss, "advantages": _drive_advantages,
           "distill": _drive_distill}


# --------------------------------------------------------------------------------------------
# specialisation (the JIT's own code path) and compile tasks


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _variant_text(fn, signature, constexprs, attrs) -> str:
    """Pointer dtypes, constexprs, and the specialisation of the int arguments."""
    names = fn.arg_names
    parts = []
    ptr = sorted({t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")})
    parts.append("ptr " + "/".join(ptr))
    for (i,), v in sorted(constexprs.items()):
        if fn.params[i].is_constexpr:
            if v is True:
                parts.append(names[i])
            elif v is not False:
                parts.append(f"{names[i]}={_short(v)}")
    ints = []
    for i, n in enumerate(names):
        t = signature[n]
        if fn.params[i].is_constexpr:
            continue
        if t == "constexpr":
            ints.append(f"{n}=={_short(constexprs[(i,)])}")
        elif t in ("i32", "i64"):
            d = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
            if t == "i64" or d:
                ints.append(f"{n}:{t}{'/16' if d else ''}")
    if ints:
        parts.append("ints " + " ".join(ints))
    return "; ".join(parts)


def _specialise(fn, args, kwargs, arch):
    """What JITFunction.run does before compiling: binder + _pack_args, for `arch`."""
    from triton import knobs  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler.compiler import make_backend  # noqa: PLC0415
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # a launch option since triton 3.7
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def collect(quick: bool = False, extra_modules: tuple[str, ...] = ()):
    """(tasks, errors): one compile task per distinct (kernel, specialisation, arch)."""
    errors = []
    modules = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        modules.append((f"alignops.kernels.{path.stem}", path.stem, DRIVERS.get(path.stem)))
    for path in extra_modules:
        modules.append((str(Path(path).resolve()), Path(path).stem, None))
    tasks, seen = [], {}
    for modname, stem, driver in modules:
        mod = _import(modname)
        jits = _jit_functions(mod)
        launched = _launched_names(mod, jits)
        if driver is None:
            driver = getattr(mod, "gpu_compile_cases", None)
            driver = (lambda m, q, _d=driver: _d()) if driver is not None else None
        if driver is None:
            if launched:
                errors.append(f"kernels/{stem}.py: no driver for its kernels {launched}; add one to "
                              "DRIVERS in bench/gpu_compile_check.py")
            continue
        sink, label_box = [], [None]
        with _recording(mod, launched, sink, label_box):
            for label, thunk in driver(mod, quick):
                label_box[0] = label
                thunk()
        reached = {fn.__name__ for fn, *_ in sink}
        for name in launched:
            if name not in reached:
                errors.append(f"{stem}.{name}: launched in kernels/{stem}.py but no driver input reaches it")
        for fn, label, args, kwargs in sink:
            for arch in ARCHS:
                signature, constexprs, attrs, options = _specialise(fn, args, kwargs, arch)
                key = (modname, fn.__name__, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.items())))
                if key in seen:
                    seen[key]["launches"] += 1
                    continue
                task = dict(module=modname, kernel=fn.__name__, arch=arch, signature=signature, constexprs=constexprs,
                            attrs=attrs, options=options, launch=label, launches=1,
                            variant=_variant_text(fn, signature, constexprs, attrs))
                seen[key] = task
                tasks.append(task)
    return tasks, errors


def _import(modname):
    if modname.endswith(".py"):
        name = "gpu_compile_extra_" + Path(modname).stem
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, modname)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(modname)


# --------------------------------------------------------------------------------------------
# the record of a full run: one fingerprint per variant


RECORD = RESULTS / "gpu-compile-check.json"


def _module_sources(path: Path, seen: set | None = None) -> str:
    """A kernels module's source and, recursively, the sources of the kernels/ modules it imports
    from (their @triton.jit helpers are compiled into its kernels)."""
    seen = set() if seen is None else seen
    if path in seen or not path.exists():
        return ""
    seen.add(path)
    text = path.read_text()
    deps = sorted(set(re.findall(r"^from \.(\w+) import", text, flags=re.M)))
    return text + "".join(_module_sources(path.with_name(f"{d}.py"), seen) for d in deps)


def _module_path(modname: str) -> Path:
    if modname.endswith(".py"):
        return Path(modname)
    return KERNELS_DIR / (modname.rsplit(".", 1)[-1] + ".py")


def fingerprint(task: dict, triton_version: str) -> str:
    """What the compiled binary depends on, hashed: triton's version, the kernel's sources, the arch
    and the specialisation. Paths are reduced to file names, so a clone elsewhere agrees."""
    import hashlib  # noqa: PLC0415
    options = {k: (tuple((n, os.path.basename(p)) for n, p in v) if k == "extern_libs" else v)
               for k, v in task["options"].items()}
    payload = repr((triton_version, task["kernel"], task["arch"], sorted(task["signature"].items()),
                    sorted(task["constexprs"].items()), sorted(task["attrs"].items()), sorted(options.items()),
                    hashlib.sha256(_module_sources(_module_path(task["module"])).encode()).hexdigest()))
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_record(path: Path = RECORD) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_record(tasks, triton_version: str, elapsed: float, path: Path = RECORD) -> None:
    record = load_record(path)
    record[f"triton {triton_version}"] = {
        "date": time.strftime("%Y-%m-%d"), "variants": len(tasks), "seconds": round(elapsed),
        "fingerprints": sorted(fingerprint(t, triton_version) for t in tasks)}
    path.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# compiling (in worker processes)


def _cuobjdump() -> str:
    import triton  # noqa: PLC0415
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _worker_init(cache_dir: str):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import warnings  # noqa: PLC0415
    # The runtime default (FP fusion on in triton 3.9) is what launches get; only the note is silenced.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _resources(cubin: bytes, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(rf"Function {re.escape(name)}:\s*\n\s*(.*)", out)
    if not m:
        raise RuntimeError(f"cuobjdump shows no function {name}:\n{out}")
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(1)))
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "static_shared": int(fields["SHARED"])}


def compile_task(task: dict) -> dict:
    import triton  # noqa: PLC0415
    from triton import knobs  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415
    res = {k: task[k] for k in ("module", "kernel", "arch", "variant", "launch", "launches")}
    res["num_warps"] = task["options"].get("num_warps")
    t0 = time.perf_counter()
    try:
        fn = getattr(_import(task["module"]), task["kernel"])
        src = ASTSource(fn, task["signature"], task["constexprs"], task["attrs"])
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", task["arch"], 32), options=task["options"])
        ptxas = log.getvalue()
        res.update(_resources(compiled.asm["cubin"], compiled.metadata.name))
        res["dynamic_shared"] = int(compiled.metadata.shared)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
        res["spill_stores"], res["spill_loads"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        res["error"] = None
    except Exception as e:  # noqa: BLE001 - every compiler failure is a result
        res["error"] = f"{type(e).__name__}: {e}"
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _error_summary(err: str) -> str:
    """One line of a compiler error: ptxas' own error lines, else the message (a CompilationError
    prints the source excerpt first and the message last)."""
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    ptxas = [ln for ln in lines if "ptxas" in ln and "error" in ln.lower()]
    head = lines[0] if lines else "?"
    tail = " | ".join(ptxas[:3]) if ptxas else (lines[-1] if lines else "")
    return head if tail == head else f"{head} ... {tail}"


def _triton_version() -> str:
    import triton  # noqa: PLC0415
    return triton.__version__


def judge(res: dict) -> list[str]:
    """The reasons this compiled variant fails (empty: ok)."""
    if res["error"]:
        return ["compile error: " + _error_summary(res["error"])]
    why = []
    threads = res["num_warps"] * 32
    regs = -(-res["regs"] // REG_UNIT) * REG_UNIT
    if regs * threads > REGISTER_FILE:
        why.append(f"{res['regs']} registers (allocated {regs}) x {threads} threads = {regs * threads} > {REGISTER_FILE}")
    shared = res["dynamic_shared"] + res["static_shared"]
    if shared > SHARED_LIMIT[res["arch"]]:
        why.append(f"shared memory {res['dynamic_shared']} dynamic + {res['static_shared']} static = {shared} bytes "
                   f"> {SHARED_LIMIT[res['arch']]} (sm_{res['arch']} per-block maximum)")
    spills = (res["spill_stores"] or 0) + (res["spill_loads"] or 0)
    if spills or res["stack"] or res["local"]:
        version = res.get("triton") or _triton_version()
        allowed = [r for k, arch, warps, v, versions, r in ALLOWED_SPILLS
                   if k == res["kernel"] and res["arch"] == arch and res["num_warps"] == warps
                   and v in res["variant"] and (versions is None or version in versions)]
        small = max(res["spill_stores"] or 0, res["spill_loads"] or 0, res["stack"]) <= ALLOWED_SPILL_BYTES
        if not allowed or not small or res["local"]:
            why.append(f"spills: {res['spill_stores']} bytes stores, {res['spill_loads']} bytes loads, "
                       f"stack frame {res['stack']} bytes, local {res['local']} bytes (none expected)")
    return why


def run_all(tasks, jobs: int):
    cache = tempfile.mkdtemp(prefix="alignops-gpu-compile-")
    if jobs <= 1:
        _worker_init(cache)
        return [compile_task(t) for t in tasks]
    # Longest first (the policy kernel), so the two workers end together.
    order = sorted(range(len(tasks)), key=lambda i: (tasks[i]["kernel"] != "_policy_loss_fused_kernel",
                                                     -(tasks[i]["options"].get("num_warps") or 0)))
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=(cache,)) as pool:
        done = list(pool.map(compile_task, [tasks[i] for i in order], chunksize=4))
    results = [None] * len(tasks)
    for i, r in zip(order, done):
        results[i] = r
    return results


# --------------------------------------------------------------------------------------------
# report


COLUMNS = ("kernel", "variant", "arch", "num_warps", "regs", "spills", "stack", "shared_dyn", "shared_static",
           "ok", "launch", "launches", "seconds")


def _row(r):
    spills = "-" if r["error"] else f"{(r['spill_stores'] or 0) + (r['spill_loads'] or 0)}"
    return {"kernel": r["kernel"], "variant": r["variant"], "arch": f"sm_{r['arch']}", "num_warps": r["num_warps"],
            "regs": r.get("regs", "-"), "spills": spills, "stack": r.get("stack", "-"),
            "shared_dyn": r.get("dynamic_shared", "-"), "shared_static": r.get("static_shared", "-"),
            "ok": "ok" if not r["why"] else "FAIL: " + "; ".join(w.splitlines()[0] for w in r["why"]),
            "launch": r["launch"], "launches": r["launches"], "seconds": r["seconds"]}


def write_report(results, errors, elapsed, jobs, out_dir: Path):
    import triton  # noqa: PLC0415
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [_row(r) for r in results]
    name = f"gpu-compile-check-triton{triton.__version__}"
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fails = [r for r in results if r["why"]]
    lines = ["# GPU compile check (ahead of time, no GPU)", "",
             f"`python -m bench.gpu_compile_check`: triton {triton.__version__}, ptxas of the wheel, "
             f"{len(results)} compiled variants ({len({(r['kernel'], r['variant']) for r in results})} per arch "
             f"x {len(ARCHS)} archs) in {elapsed:.0f} s on {jobs} processes. "
             f"Limits: regs (rounded up to {REG_UNIT}) x threads <= {REGISTER_FILE}; dynamic + static shared <= "
             + ", ".join(f"{SHARED_LIMIT[a]} B (sm_{a})" for a in ARCHS) + "; no spill or stack frame"
             + (f" except (at most {ALLOWED_SPILL_BYTES} B) "
                + "; ".join(f"{k} sm_{a} {w} warps [{v}]{' triton ' + '/'.join(vs) if vs else ''}: {r}"
                            for k, a, w, v, vs, r in ALLOWED_SPILLS) if ALLOWED_SPILLS else "")
             + ".", "",
             f"**{'PASS' if not fails and not errors else 'FAIL'}**: {len(fails)} failing variants, "
             f"{len(errors)} coverage errors.", ""]
    for e in errors:
        lines.append(f"- coverage error: {e}")
    if fails:
        lines += ["## Failures", ""]
        for r in fails:
            lines.append(f"- `{r['kernel']}` sm_{r['arch']} num_warps={r['num_warps']} [{r['variant']}] "
                         f"(launch: {r['launch']}): " + "; ".join(r["why"]))
        lines.append("")
    lines += ["Not compiled: SOFTWARE_BF16_ROUNDING=True (the launchers set it only under TRITON_INTERPRET); "
              "an int argument equal to 1 becomes a constant (covered where a driver input has it, e.g. V = 1); "
              "INV_TEMP values other than 1 and 1/0.7 and STD_EPS/GAMMA values other than the ones listed "
              "(each value is its own compile, with the same code).",
              "", "## Per kernel and arch", "",
              "| kernel | arch | variants | num_warps | max regs | max regs x threads | max spill bytes | "
              "max stack | max shared (dyn+static) | failures |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (k, a), rs in groups.items():
        good = [r for r in rs if not r["error"]]
        nws = sorted({r["num_warps"] for r in rs})
        def mx(f, rs=good):
            return max((f(r) for r in rs), default="-")
        lines.append(f"| {k} | sm_{a} | {len(rs)} | {','.join(map(str, nws))} | {mx(lambda r: r['regs'])} | "
                     f"{mx(lambda r: -(-r['regs'] // REG_UNIT) * REG_UNIT * r['num_warps'] * 32)} | "
                     f"{mx(lambda r: (r['spill_stores'] or 0) + (r['spill_loads'] or 0))} | {mx(lambda r: r['stack'])} | "
                     f"{mx(lambda r: r['dynamic_shared'] + r['static_shared'])} | {sum(1 for r in rs if r['why'])} |")
    lines += ["", "## Every variant", "",
              "`variant`: pointer dtypes; constexprs (a bare name is True, False ones are left out); the int "
              "arguments the JIT specialised (`:i64`, `/16` divisible by 16, `==1` a constant). `launch`: the "
              "launcher input that first produced it (`launches`: how many driver inputs map to it).", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out_dir / f"{name}.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small subset; writes no report unless --out is given")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=None, help=f"report folder (default {RESULTS} for a full run)")
    ap.add_argument("--module", action="append", default=[],
                    help="an extra .py file with @triton.jit kernels and gpu_compile_cases() -> [(label, thunk)]")
    ap.add_argument("--only-extra", action="store_true", help="check only the --module files")
    ap.add_argument("--changed-only", action="store_true",
                    help=f"compile only the variants whose fingerprint {RECORD.name} lacks for this triton")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # triton.compile needs a process in which triton was imported without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "bench.gpu_compile_check", *argv], env=env, cwd=ROOT).returncode
    t0 = time.perf_counter()
    import warnings  # noqa: PLC0415
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        import triton  # noqa: PLC0415, F401
    except ImportError:
        print("gpu-compile-check: triton is not installed, nothing checked", file=sys.stderr)
        return 2
    if args.only_extra:
        global KERNELS_DIR  # noqa: PLW0603
        KERNELS_DIR = Path(tempfile.mkdtemp())  # no kernels/*.py modules
    tasks, errors = collect(args.quick, tuple(args.module))
    t_collect = time.perf_counter() - t0
    version = triton.__version__
    full = not (args.quick or args.only_extra or args.module or args.changed_only)
    if args.changed_only:
        entry = load_record().get(f"triton {version}")
        known = set(entry["fingerprints"]) if entry else set()
        todo = [t for t in tasks if fingerprint(t, version) not in known]
        print(f"gpu-compile-check: triton {version}: {len(tasks) - len(todo)} of {len(tasks)} variants unchanged since "
              + (f"the recorded full run of {entry['date']}" if entry else "(no recorded full run for this triton)")
              + f", {len(todo)} to compile")
        tasks = todo
    results = run_all(tasks, args.jobs) if tasks else []
    elapsed = time.perf_counter() - t0
    for r in results:
        r["why"] = judge(r)
    out = args.out if args.out is not None else (RESULTS if full else None)
    report = write_report(results, errors, elapsed, args.jobs, out) if out is not None else None
    for r in results:
        status = "ok  " if not r["why"] else "FAIL"
        res = ("" if r["error"] else
               f"regs={r['regs']} spill={(r['spill_stores'] or 0) + (r['spill_loads'] or 0)} stack={r['stack']} "
               f"shared={r['dynamic_shared']}+{r['static_shared']}")
        print(f"{status} {r['kernel']} sm_{r['arch']} nw={r['num_warps']} {res} [{r['variant']}]")
    failures = [r for r in results if r["why"]]
    for e in errors:
        print(f"gpu-compile-check: FAIL coverage: {e}", file=sys.stderr)
    for r in failures:
        if r["error"]:
            print(f"gpu-compile-check: compiler output for {r['kernel']} sm_{r['arch']} [{r['variant']}]:\n"
                  + "\n".join(r["error"].strip().splitlines()[:40]), file=sys.stderr)
        for w in r["why"]:
            print(f"gpu-compile-check: FAIL kernel={r['kernel']} arch=sm_{r['arch']} num_warps={r['num_warps']} "
                  f"variant=[{r['variant']}] launch=[{r['launch']}]: {w}", file=sys.stderr)
    print(f"gpu-compile-check: {len(results)} variants compiled ({len(failures)} failing, {len(errors)} coverage "
          f"errors) in {elapsed:.1f} s (collect {t_collect:.1f} s, {args.jobs} processes)"
          + (f"; report: {report}" if report is not None else ""))
    if failures or errors:
        return 1
    if full:
        save_record(tasks, version, elapsed)
        print(f"gpu-compile-check: recorded {len(tasks)} fingerprints for triton {version} in {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
