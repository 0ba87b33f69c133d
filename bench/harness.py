"""The benchmark harness every op shares.

A benchmark is a list of `Case`s: one shape, a function that makes fresh inputs, and named
implementations (`alignops`, `eager`, `compile`, peers...). Each implementation maps the inputs to
a scalar loss (or a tensor that is summed); the harness times forward, backward and both, measures
peak memory above the inputs, and writes `bench/results/<op>-<machine>.{csv,md}`.

    from bench.harness import Case, run_cases
    run_cases("token_logprobs", [Case(name, shape, make_inputs, impls, grad_inputs=("logits",))])

Timings are medians over repeats after warm-up. Peak memory: on CUDA the allocator's peak; on CPU
the process's peak RSS (reset through /proc/self/clear_refs before each measurement), both minus
the memory held before the call, so they count what the implementation allocates on top of its
inputs. Bandwidth (GB/s) is reported when a case gives `bytes_moved` for a mode; a case that also
names `copy_input` (the logits) gets the copy floor measured in the same process: a plain
`dst.copy_(src)` of that input (read + write bytes over its time, column `copy_GB/s`), and each
row's GB/s as a percentage of it (`%_of_copy`; 100 % = the op's ideal bytes moved at the copy's rate).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from alignops.env import ISA_LEVELS, machine_description
from alignops.env import machine_isa as _machine_isa

def _fix_mmap_threshold():
    """glibc raises its mmap threshold after large frees, after which freed tensors stay in the
    heap and peak RSS stops seeing new allocations; a fixed threshold returns them to the OS.
    Set only when a benchmark runs, never at import: every allocation above 64 KiB then costs an
    mmap/munmap, which made the trainer 2x slower in processes that imported this module."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass
class Case:
    name: str                                   # e.g. "N=2048 V=32000 fp32"
    shape: dict                                 # columns written to the table (N, V, dtype, ...)
    make_inputs: Callable[[], dict]             # fresh inputs (tensors that need grad set up inside)
    impls: dict[str, Callable[[dict], torch.Tensor]]
    grad_inputs: tuple[str, ...] = ()           # input names that get .requires_grad_() for bwd
    bytes_moved: dict[str, int] = dataclasses.field(default_factory=dict)  # mode -> ideal bytes
    modes: tuple[str, ...] = MODES
    warmup: int | None = None                   # per-case overrides of run_cases' warmup / reps
    reps: int | None = None                     # (a cap: the smaller of this and --reps is used)
    copy_input: str | None = None               # input whose device copy is the bandwidth floor


def machine_name() -> str:
    if env := os.environ.get("ALIGNOPS_BENCH_MACHINE"):
        return env
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for tag in ("h200", "h100", "a100", "l40s", "l4", "a10", "4090", "3090"):
            if tag in name:
                return tag
        return name.replace(" ", "-")
    return f"cpu{os.cpu_count()}"


def supported_isas() -> list[str]:
    top = _machine_isa()
    return [lv for lv in ISA_LEVELS if ISA_LEVELS.index(lv) <= ISA_LEVELS.index(top)]


# --------------------------------------------------------------------------------------------
# measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak bytes allocated inside the block, above what was held when it began."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            except OSError:
                pass
            self.base = _rss_bytes("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _rss_bytes("VmHWM:") - self.base
        return False


def _prepare(case: Case, need_grad: bool) -> dict:
    inputs = case.make_inputs()
    if need_grad:
        for k in case.grad_inputs:
            inputs[k] = inputs[k].detach().requires_grad_(True)
    return inputs


def _device_of(inputs: dict) -> torch.device:
    return next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))


def _loss(out) -> torch.Tensor:
    out = out.loss if hasattr(out, "loss") else out
    if isinstance(out, (tuple, list)):
        out = sum(o.float().sum() for o in out if isinstance(o, torch.Tensor))
    return out if out.dim() == 0 else out.float().sum()


def time_impl(case: Case, fn, mode: str, warmup: int, reps: int) -> tuple[float, int]:
    """(median milliseconds, peak extra bytes) of one implementation in one mode."""
    need_grad = mode != "fwd"
    inputs = _prepare(case, need_grad)
    device = _device_of(inputs)

    def clear_grads():
        for k in case.grad_inputs:
            if isinstance(inputs.get(k), torch.Tensor):
                inputs[k].grad = None

    def once():
        clear_grads()
        _sync(device)
        if mode == "fwd":
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(inputs)
            _sync(device)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        loss = _loss(fn(inputs))
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        return (t2 - t1) if mode == "bwd" else (t2 - t0)

    for _ in range(warmup):
        once()
    clear_grads()  # so the peak counts the gradient this call writes
    with PeakMemory(device) as mem:
        once()
    times = [once() for _ in range(reps)]
    del inputs
    return statistics.median(times) * 1e3, mem.peak


def copy_floor(case: Case, reps: int = 10) -> tuple[float, float] | None:
    """(median ms, GB/s) of `dst.copy_(src)` with src the case's `copy_input` (the logits): the
    bandwidth floor an op that reads (and writes) that tensor is measured against, in the same
    process and on the same tensor. None when the case names no copy input."""
    if not case.copy_input:
        return None
    inputs = case.make_inputs()
    src = inputs[case.copy_input].detach()
    dst = torch.empty_like(src)
    device = src.device
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(max(reps, 10)):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    del inputs, src, dst
    return ms, nbytes / (ms * 1e-3) / 1e9


def run_cases(op: str, cases: list[Case], *, warmup: int = 2, reps: int = 5, baseline: str = "eager",
              out_dir: str = RESULTS, machine: str | None = None, quiet: bool = False,
              write: bool = True) -> list[dict]:
    """Times every implementation of every case and writes the CSV and Markdown tables (again after
    every mode of every case, so a run stopped part-way leaves the rows it measured)."""
    _fix_mmap_threshold()
    machine = machine or machine_name()
    # what exists now (modules: torch, transformers, the peers) is never garbage; frozen, the
    # gc.collect() before every measurement skips it (0.3 s a call with transformers imported)
    gc.collect()
    gc.freeze()
    rows = []
    for case in cases:
        floor = None
        if case.copy_input and case.bytes_moved:
            try:
                floor = copy_floor(case)
            except Exception as e:  # noqa: BLE001 - the op rows matter more than the floor
                print(f"  {case.name}: copy floor not measured ({type(e).__name__}: {str(e)[:100]})")
            if floor and not quiet:
                print(f"  {case.name:>28} copy floor ({case.copy_input}): {floor[0]:9.3f} ms  {floor[1]:8.1f} GB/s")
        for mode in case.modes:
            base_ms = None
            results = {}
            case_warmup = warmup if case.warmup is None else case.warmup
            case_reps = reps if case.reps is None else min(reps, case.reps)
            interrupted = False
            for impl, fn in case.impls.items():
                try:
                    ms, peak = time_impl(case, fn, mode, case_warmup, case_reps)
                except KeyboardInterrupt:  # e.g. bench/gpu.sh's timeout: keep what this mode measured
                    interrupted = True
                    break
                except Exception as e:  # a peer that does not run here is reported, not fatal
                    if not quiet:
                        print(f"  {impl:>10} {mode:>8}: skipped ({type(e).__name__}: {str(e)[:100]})")
                    continue
                results[impl] = (ms, peak)
                if impl == baseline:
                    base_ms = ms
            for impl, (ms, peak) in results.items():
                row = {"op": op, "case": case.name, **case.shape, "impl": impl, "mode": mode,
                       "ms": round(ms, 3), "peak_extra_MiB": round(peak / 2**20, 1),
                       f"speedup_vs_{baseline}": round(base_ms / ms, 2) if base_ms else None}
                if mode in case.bytes_moved:
                    gbs = case.bytes_moved[mode] / (ms * 1e-3) / 1e9
                    row["GB/s"] = round(gbs, 1)
                    if floor:
                        row["copy_GB/s"] = round(floor[1], 1)
                        row["%_of_copy"] = round(100 * gbs / floor[1], 1)
                rows.append(row)
                if not quiet:
                    print(f"  {case.name:>28} {mode:>8} {impl:>12}: {ms:9.3f} ms  "
                          f"peak +{peak / 2**20:8.1f} MiB  x{row[f'speedup_vs_{baseline}'] or 0:.2f}"
                          + (f"  {row['%_of_copy']:5.1f} % of copy" if "%_of_copy" in row else ""))
            if write and rows:
                write_tables(op, rows, out_dir, machine)
            if interrupted:
                print(f"  interrupted in {case.name} {mode}: the {len(rows)} rows measured so far are written",
                      flush=True)
                gc.unfreeze()
                raise KeyboardInterrupt
    if write and not rows:
        write_tables(op, rows, out_dir, machine)
    gc.unfreeze()
    return rows


def write_tables(op: str, rows: list[dict], out_dir: str, machine: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    base = os.path.join(out_dir, f"{op}-{machine}")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(base + ".md", "w") as f:
        f.write(f"# {op} on {machine}\n\n{machine_description()}\n\n")
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |\n")
    return base + ".csv", base + ".md"


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times) / 1e9


def _pin_inductor_vector_width(level: str) -> None:
    """torch.compile's C++ code at the level being measured. Left to pick its vector ISA itself on
    an AVX-512 Xeon, torch 2.13's inductor produced a backward that corrupts the heap (glibc aborts
    with "unaligned tcache chunk"); with the width pinned to 512 or 256 bits it runs."""
    width = {"avx512": 512, "avx2": 256}.get(level.lower())
    if width:
        import torch._inductor.config as inductor_config  # noqa: PLC0415
        inductor_config.cpp.simdlen = width


def lazy_compile(fn):
    """torch.compile(fn), made at the first call (importing dynamo takes seconds: a run that leaves
    the compile rows out, e.g. with --skip-impls compile, never pays it)."""
    compiled = None

    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return run


def parse_size(text: str | None) -> dict | None:
    """--size "N=64,V=1000,H=64" -> {"N": 64, "V": 1000, "H": 64} (None for None or "")."""
    if not text:
        return None
    size = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--size: expected KEY=INT[,KEY=INT...], got {text!r}")
        try:
            size[key.strip()] = int(value)
        except ValueError:
            raise SystemExit(f"--size: {key.strip()}={value!r} is not an integer") from None
    return size


def skip_impls(cases: list[Case], patterns: str | None) -> list[Case]:
    """Drops the implementations whose names match one of the comma-separated fnmatch patterns."""
    pats = [p.strip() for p in (patterns or "").split(",") if p.strip()]
    for case in cases:
        case.impls = {k: fn for k, fn in case.impls.items() if not any(fnmatch.fnmatchcase(k, p) for p in pats)}
    return cases


def out_dir_of(argv=None) -> str:
    """The --out-dir of a benchmark command line (default bench/results, or $ALIGNOPS_BENCH_OUT)."""
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out-dir", default=os.environ.get("ALIGNOPS_BENCH_OUT") or RESULTS)
    return p.parse_known_args(list(sys.argv[1:] if argv is None else argv))[0].out_dir


def bench_main(op: str, doc: str | None, cases_for, argv=None, reps: int = 5, baseline: str = "eager") -> list[dict]:
    """The command line every bench_<op>.py shares: --device, --backend, --quick, --size, --skip-impls,
    --reps, --isa, --out-dir. `cases_for(device=, quick=, backend=, size=)` returns the cases
    (backend and size only if it takes them).

    On CPU every ISA level runs in its own process with ATEN_CPU_CAPABILITY set, so torch's eager
    kernels, torch.compile's code and alignops's kernels all run at that level, as on a CPU whose
    best level it is; the rows of every level go into one table (column `isa`)."""
    import argparse  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="alignops backend (default: automatic)")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--size", default=None, metavar="N=..,V=..[,H=..]",
                   help="one case of this shape instead of the default ones (bench/gpu.sh --dry-run: toy "
                        "sizes; keys as the benchmark names them: N rows, V vocabulary, H hidden, B x T = N)")
    p.add_argument("--skip-impls", default=None, metavar="PATTERNS",
                   help="comma-separated fnmatch patterns of implementations to leave out (e.g. compile)")
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--isa", default=None,
                   help="CPU: comma-separated ISA levels, or 'all' (default: every level above 'default' "
                        "this CPU supports, or 'default' alone on a CPU without AVX2), or 'here': this "
                        "process, at the level it runs at, no child process (a smoke run)")
    p.add_argument("--out-dir", default=os.environ.get("ALIGNOPS_BENCH_OUT") or RESULTS,
                   help="where the tables go (default: bench/results, or $ALIGNOPS_BENCH_OUT)")
    p.add_argument("--rows-to", default=None, help=argparse.SUPPRESS)  # child run: rows as JSON here
    args = p.parse_args(argv)
    size = parse_size(args.size)
    if args.device == "cuda":
        print(f"measured copy bandwidth: {copy_bandwidth_gbs(torch.device('cuda')):.0f} GB/s")
    kwargs = {"device": args.device, "quick": args.quick}
    params = inspect.signature(cases_for).parameters
    if "backend" in params:
        kwargs["backend"] = args.backend
    if size is not None:
        if "size" in params:
            kwargs["size"] = size
        else:
            print(f"{op}: --size ignored (this benchmark has no size option)")
    if args.device == "cpu" and args.rows_to:
        _pin_inductor_vector_width(os.environ.get("ATEN_CPU_CAPABILITY", ""))
    if args.device != "cpu" or args.rows_to or args.isa == "here":
        cases = skip_impls(cases_for(**kwargs), args.skip_impls)
        if args.device == "cpu" and args.isa == "here" and any("compile" in k for c in cases for k in c.impls):
            _pin_inductor_vector_width(_machine_isa())
        rows = run_cases(op, cases, reps=args.reps, baseline=baseline, out_dir=args.out_dir, write=not args.rows_to)
        if args.rows_to:
            with open(args.rows_to, "w") as f:
                json.dump(rows, f)
        return rows
    supported = supported_isas()
    if args.isa in (None, ""):
        levels = [lv for lv in supported if lv != "default"] or ["default"]
    elif args.isa == "all":
        levels = supported
    else:
        levels = [lv.strip().lower() for lv in args.isa.split(",") if lv.strip()]
        bad = [lv for lv in levels if lv not in supported]
        if bad:
            raise SystemExit(f"--isa {bad}: this CPU supports {supported}")
    # the module that defines cases_for (under `python -m bench.run` __main__ is bench.run, whose
    # child would run every benchmark and hand back the last one's rows)
    module = cases_for.__module__ if cases_for.__module__ != "__main__" else (
        sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else None)
    if module is None:
        raise SystemExit("run benchmarks as modules: python -m bench.bench_<op>")
    rows = []
    passthrough = ["--device", "cpu", "--reps", str(args.reps)] + (["--quick"] if args.quick else []) + \
        (["--backend", args.backend] if args.backend else []) + (["--size", args.size] if args.size else []) + \
        (["--skip-impls", args.skip_impls] if args.skip_impls else [])
    for level in levels:
        print(f"--- ISA level {level} (ATEN_CPU_CAPABILITY={level}, ALIGNOPS_CPU_ISA={level})", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            env = dict(os.environ, ATEN_CPU_CAPABILITY=level, ALIGNOPS_CPU_ISA=level)
            subprocess.run([sys.executable, "-m", module, *passthrough, "--rows-to", tmp.name], env=env, check=True)
            with open(tmp.name) as f:
                rows += [{"isa": level, **r} for r in json.load(f)]
    write_tables(op, rows, args.out_dir, machine_name())
    return rows


# --------------------------------------------------------------------------------------------
# the headline numbers of a run (bench/gpu.sh puts them in its summary)


def headline(out_dir: str) -> str:
    """Markdown from the tables in `out_dir`: token_logprobs and policy_loss (every implementation,
    each mode) as GB/s and % of the copy floor measured in the same run, and fused_linear's
    forward + backward against the bare GEMMs."""
    import glob  # noqa: PLC0415

    def read(op):
        rows = []
        for path in sorted(glob.glob(os.path.join(out_dir, f"{op}-*.csv"))):
            with open(path, newline="") as f:
                rows += list(csv.DictReader(f))
        return rows

    out = []
    for op in ("token_logprobs", "policy_loss"):
        rows = read(op)
        out += [f"### {op}: % of the copy floor (dst.copy_(logits), same run)", ""]
        if not rows:
            out += ["(no table)", ""]
            continue
        out += ["| isa | case | mode | impl | ms | GB/s | copy GB/s | % of copy | x eager |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r.get('isa', '')} | {r['case']} | {r['mode']} | {r['impl']} | {r['ms']} | {r.get('GB/s', '')} | "
                       f"{r.get('copy_GB/s', '')} | {r.get('%_of_copy', '')} | {r.get('speedup_vs_eager', '')} |")
        out.append("")
    rows = read("fused_linear")
    out += ["### fused_linear: forward + backward against the bare GEMMs", ""]
    if not rows:
        out += ["(no table)", ""]
    else:
        gemms = {(r.get("isa", ""), r["case"]): float(r["ms"]) for r in rows
                 if r["impl"] == "gemms" and r["mode"] == "fwd+bwd"}
        out += ["| isa | case | impl | fwd+bwd ms | x gemms | peak MiB |", "|---|---|---|---|---|---|"]
        for r in rows:
            if r["mode"] != "fwd+bwd":
                continue
            base = gemms.get((r.get("isa", ""), r["case"]))
            ratio = f"{float(r['ms']) / base:.2f}x" if base else "—"
            out.append(f"| {r.get('isa', '')} | {r['case']} | {r['impl']} | {r['ms']} | {ratio} | {r['peak_extra_MiB']} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "headline":
        print(headline(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m bench.harness headline OUT_DIR")
