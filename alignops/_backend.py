"""Backend selection and the kernel registry.

Every logits-pass op has four implementations (docs/design.md "Backends"):

    torch   eager reference, float64-capable, the oracle (alignops/reference/)
    cpu     C++ kernels in alignops._C (csrc/cpu/)
    triton  Triton kernels in alignops.kernels (kernels/); CUDA tensors, or CPU under TRITON_INTERPRET=1
    cuda    CUDA kernels in alignops._C (csrc/cuda/), plain .cu files with C launchers

`backend=None` picks: CUDA tensor -> triton, else cuda, else torch; CPU tensor -> cpu, else torch.
`ALIGNOPS_BACKEND` overrides. A backend that was named but cannot run raises; it never silently
falls back. The automatic choice falls back to torch only with a one-time warning naming the cause
(`resolve_backend`), and so does a kernel that fails to load (`kernel_or_reason`).

Kernels are looked up by (op, backend) in one registry. Each kernel writes into output tensors
that the caller allocated, so the same Python autograd code drives every backend.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import warnings
from typing import Callable

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
C_ABI_VERSION = 4  # must equal C_ABI_VERSION in setup.py


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


# --------------------------------------------------------------------------------------------
# alignops._C

_c_module = None
_c_error: str | None = None
_cpu_error: str | None = None
_c_tried = False  # set last, once _c_module and the errors hold their final values
# Threads entering their first op together: one imports alignops._C, the others wait for its
# outcome (with _c_tried set first, they read "no module, no error" meanwhile, so a named cpu
# backend raised BackendUnavailableError(None) and the automatic choice picked cpu over a broken
# library; tests/test_threads.py).
_c_lock = threading.Lock()

ISA_LEVELS = ("default", "avx2", "avx512")


def load_c():
    """Import alignops._C once. Returns the module or None; never raises."""
    if _c_tried:
        return _c_module
    # dynamo cannot trace a lock: while it traces a first call the import goes unlocked (Python's
    # import lock still serialises the import itself, and a racing thread writes the same values)
    if torch.compiler.is_compiling():
        return _load_c_once()
    with _c_lock:
        return _load_c_once()


def _load_c_once():
    global _c_tried
    if _c_tried:
        return _c_module
    try:
        return _import_c()
    finally:
        _c_tried = True


def _import_c():
    global _c_module, _c_error, _cpu_error
    rebuild = "rebuild it with `pip install -e . --no-build-isolation` (or `make build`)"
    try:
        from alignops import _C  # noqa: PLC0415 - registers torch.ops.alignops_C.*
    except ImportError as e:
        _c_error = f"alignops._C could not be loaded ({e}); {rebuild}"
        return None
    # Plain attributes, not pybind calls: this runs inside torch.compile tracing when the first
    # call of a process is compiled, and dynamo can read an int but not call into pybind.
    abi = getattr(_C, "ABI_VERSION", -1)
    if abi != C_ABI_VERSION:
        _c_error = (f"alignops._C is stale (built for op ABI {abi}, this source needs "
                    f"{C_ABI_VERSION}); {rebuild}")
        return None
    _c_module, _c_error = _C, None
    # Importing _C chose the CPU kernels' ISA level and opened its library (csrc/cpu_isa.cpp).
    _cpu_error = f"the CPU kernels could not be loaded: {_C.CPU_ISA_ERROR}" if _C.CPU_ISA_ERROR else None
    requested = _C.CPU_ISA_REQUESTED
    if _C.CPU_ISA and requested in ISA_LEVELS and ISA_LEVELS.index(requested) > ISA_LEVELS.index(_C.CPU_ISA):
        warnings.warn(f"alignops: ALIGNOPS_CPU_ISA={requested} can only lower the level; this CPU runs "
                      f"{_C.CPU_ISA} (torch reports {_C.TORCH_CPU_CAPABILITY})", RuntimeWarning, stacklevel=4)
    return _C


def cpu_isa() -> dict:
    """The CPU kernels' ISA levels: compiled into this install, chosen at load, and why."""
    c = load_c()
    if c is None:
        return {"compiled": build_info().get("cpu_isas"), "chosen": None, "error": _c_error}
    return {"compiled": list(c.CPU_ISA_COMPILED), "chosen": c.CPU_ISA or None,
            "torch_cpu_capability": c.TORCH_CPU_CAPABILITY, "ALIGNOPS_CPU_ISA": c.CPU_ISA_REQUESTED or None,
            "error": _cpu_error}


def cpu_error() -> str | None:
    """Why the cpu backend's kernels cannot run (alignops._C missing or stale, or no ISA library)."""
    load_c()
    return _c_error or _cpu_error


def c_error() -> str | None:
    load_c()
    return _c_error


def build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}


def c_has_cuda() -> bool:
    c = load_c()
    return bool(c is not None and c.WITH_CUDA)


# --------------------------------------------------------------------------------------------
# availability


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_importable() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on tensors of `device`, else the reason."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
        return cpu_error()
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreted():
            return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend does not run on {device.type} tensors"
        return _triton_importable()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        err = c_error()
        if err:
            return err
        if not c_has_cuda():
            return "alignops._C was built without CUDA kernels (no nvcc or CPU-only torch at build time)"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def available_backends(device: torch.device | str) -> list[str]:
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device or a device string, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must name a torch device type (e.g. 'cpu', 'cuda:0'), got {device!r}") from e
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


def requested_backend(backend: str | None) -> str | None:
    """The backend the caller named: `backend`, else ALIGNOPS_BACKEND, else None (automatic)."""
    if backend is None:
        backend = os.environ.get("ALIGNOPS_BACKEND") or None
    return backend


# One warning per distinct message (device and cause) per process. Under torch.compile tracing a
# warning cannot be raised (dynamo rejects warnings.warn in a full graph): the message is kept, as
# a traced side effect, and raised by the next eager call that resolves a backend.
_warned: set[str] = set()
_pending: set[str] = set()


def _flush_pending(stacklevel: int) -> None:
    if _pending and not torch.compiler.is_compiling():
        for m in sorted(_pending - _warned):
            _warned.add(m)
            warnings.warn(m, RuntimeWarning, stacklevel=stacklevel + 1)
        _pending.clear()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """A RuntimeWarning with `message`, once per process (kept for the next eager call while
    torch.compile traces)."""
    if torch.compiler.is_compiling():
        _pending.add(message)
        return
    _flush_pending(stacklevel + 1)
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def resolve_backend(backend: str | None, device: torch.device, *, supported: tuple[str, ...] = BACKENDS,
                    what: str = "this op") -> str:
    """The backend an op runs with: the named one (or ALIGNOPS_BACKEND), else the automatic choice.

    `supported`: the backends that have kernels for the op (`what` names it in messages). A named
    backend that cannot run, or has no kernel for the op, raises BackendUnavailableError with the
    reason. The automatic choice (CUDA tensor: triton, then cuda; CPU tensor: cpu) falls back to
    the torch backend only with a one-time RuntimeWarning naming why each fast backend cannot run.
    """
    _flush_pending(3)
    backend = requested_backend(backend)
    if backend is not None:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend not in supported:
            raise BackendUnavailableError(f"backend={backend!r} cannot run {what}: it has no {backend!r} kernel "
                                          f"(kernels: {', '.join(supported)})")
        reason = why_unavailable(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot run: {reason}")
        return backend
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
    causes = []
    for b in order:
        if b not in supported:
            causes.append(f"{what} has no {b} kernel")
            continue
        reason = why_unavailable(b, device)
        if reason is None:
            return b
        causes.append(f"{b}: {reason}")
    if not order:
        causes.append(f"no fast backend runs on {device.type} tensors")
    warn_once(f"alignops: {what} on {device.type} tensors falls back to the slow torch backend ("
              + "; ".join(causes) + ")", stacklevel=4)
    return "torch"


# --------------------------------------------------------------------------------------------
# kernel registry: (op, backend) -> zero-argument loader returning the kernel callable

_KERNEL_LOADERS: dict[tuple[str, str], Callable[[], Callable]] = {}
_KERNEL_CACHE: dict[tuple[str, str], Callable] = {}


def register_kernel(op: str, backend: str, loader: Callable[[], Callable]) -> None:
    _KERNEL_LOADERS[(op, backend)] = loader


def kernel(op: str, backend: str) -> Callable:
    key = (op, backend)
    fn = _KERNEL_CACHE.get(key)
    if fn is None:
        if key not in _KERNEL_LOADERS:
            raise BackendUnavailableError(f"op {op!r} has no {backend!r} kernel")
        fn = _KERNEL_CACHE[key] = _KERNEL_LOADERS[key]()
    return fn


def kernel_or_reason(op: str, backend: str) -> tuple[Callable | None, str | None]:
    """(kernel, None), or (None, why it cannot be loaded): no kernel registered, alignops._C missing
    or stale or without the op, or its Triton module failing to import. For optional fast paths
    whose caller reports the reason (an error when the backend was named, else warn_once); other
    errors propagate."""
    try:
        return kernel(op, backend), None
    except (BackendUnavailableError, ImportError, AttributeError) as e:
        return None, f"{type(e).__name__}: {e}"


def _c_op(name: str) -> Callable[[], Callable]:
    def load():
        if load_c() is None:
            raise BackendUnavailableError(c_error())
        return getattr(torch.ops.alignops_C, name)
    return load


def _cuda_op(name: str) -> Callable[[], Callable]:
    """CUDA launchers take the current stream as an int, so the bindings need no CUDA headers."""
    def load():
        op = _c_op(name)()

        def run(*args):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            with torch.cuda.device(device):
                op(*args, torch.cuda.current_stream(device).cuda_stream)
        return run
    return load


def _triton_fn(module: str, name: str) -> Callable[[], Callable]:
    def load():
        return getattr(importlib.import_module(f"alignops.kernels.{module}"), name)
    return load


def _torch_ref(module: str, name: str) -> Callable[[], Callable]:
    def load():
        return getattr(importlib.import_module(f"alignops.reference.{module}"), name)
    return load


# The logits pass (contract: alignops/logits/kernels.py).
for _op in ("token_stats_fwd", "token_stats_bwd"):
    register_kernel(_op, "torch", _torch_ref("token_stats", _op))
    register_kernel(_op, "cpu", _c_op(f"{_op}_cpu"))
    register_kernel(_op, "cuda", _cuda_op(f"{_op}_cuda"))
    register_kernel(_op, "triton", _triton_fn("token_stats", _op))


# Advantage kernels (contract: alignops/advantages/__init__.py). No cuda kernel: on CUDA tensors
# they run with triton, or torch when triton is missing.
for _op in ("group_advantages", "masked_moments", "whiten_apply", "gae_scan"):
    register_kernel(_op, "torch", _torch_ref("advantages", _op))
    register_kernel(_op, "cpu", _c_op(f"{_op}_cpu"))
    register_kernel(_op, "triton", _triton_fn("advantages", _op))

# Distillation (contract: alignops/distill.py). No cuda kernel: triton on CUDA tensors.
for _op in ("distill_fwd", "distill_bwd"):
    register_kernel(_op, "torch", _torch_ref("distill", _op))
    register_kernel(_op, "cpu", _c_op(f"{_op}_cpu"))
    register_kernel(_op, "triton", _triton_fn("distill", _op))

# One-launch policy loss (contract: alignops/policy/one_launch.py).
register_kernel("policy_loss_fused", "cpu", _c_op("policy_loss_fused_cpu"))
register_kernel("policy_loss_fused", "triton", _triton_fn("policy_loss", "policy_loss_fused"))
