"""`python -m alignops.env`: what was built, which CPU kernel level runs, and which backends run here."""

import json
import os
import sys


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
