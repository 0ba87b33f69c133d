"""`python -m alignops.env`: what was built, which CPU kernel level runs, and which backends run here."""

import functools
import json
import os
import platform
import subprocess
import sys

ISA_LEVELS = ("default", "avx2", "avx512")


def machine_description() -> str:
    """One line naming the machine, for a benchmark table or the demo's header."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, CPU capability {machine_isa()}")


@functools.lru_cache(maxsize=None)
def machine_isa() -> str:
    """torch's capability of this CPU, unlowered (a child run sets ATEN_CPU_CAPABILITY)."""
    import torch

    if "ATEN_CPU_CAPABILITY" not in os.environ:  # this process runs at the CPU's own level
        out = str(torch.backends.cpu.get_cpu_capability())
        return out.lower() if out.lower() in ISA_LEVELS else "default"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    return out.lower() if out.lower() in ISA_LEVELS else "default"


def report() -> dict:
    import torch

    from alignops import _backend

    c = _backend.load_c()
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "build": _backend.build_info() or "no _build_info.json (alignops._C was never built)",
        "_C": "loaded" if c is not None else _backend.c_error(),
        "_C_with_cuda": _backend.c_has_cuda(),
        # the CPU kernels' ISA level: compiled (every level of the architecture) and chosen at load
        "cpu_isa": _backend.cpu_isa(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "backends_cpu_tensors": _backend.available_backends("cpu"),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["backends_cuda_tensors"] = _backend.available_backends("cuda")
    return info


def main():
    print(json.dumps(report(), indent=1))


if __name__ == "__main__":
    main()
