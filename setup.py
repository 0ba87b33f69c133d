"""Builds alignops._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Install with `pip install -e . --no-build-isolation` so the build uses the torch already in the
environment (an isolated build env would download a CUDA torch of several GB).
"""

import datetime
import glob
import json
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))
# Bumped whenever the C++ op signatures change, so a stale _C is detected at import.
C_ABI_VERSION = 2


def cpu_isa_flags():
    """at::vec picks its Vectorized<float> specialisation from CPU_CAPABILITY_* macros, not from
    -m flags, so both must be set together. ALIGNOPS_CPU_ISA=avx512|avx2|default overrides."""
    isa = os.environ.get("ALIGNOPS_CPU_ISA")
    if isa is None:
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            flags = ""
        if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
            isa = "avx512"
        elif "avx2" in flags and "fma" in flags:
            isa = "avx2"
        else:
            isa = "default"
    if isa == "avx512":
        return isa, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                     "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return isa, ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def cuda_archs():
    env = os.environ.get("ALIGNOPS_CUDA_ARCHS")  # e.g. "80;90"
    if env:
        return [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}{minor}"]
    return ["80", "90"]


def want_cuda():
    if os.environ.get("ALIGNOPS_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


isa, isa_flags = cpu_isa_flags()
with_cuda = want_cuda()
# -ffp-contract=off: with FMA available GCC would fuse `x * inv_temp - max` into one fma, so z_y - max
# is no longer computed from the same rounded z as max itself (a 1e-4 error at |z| ~ 1000).
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off",
             f"-DALIGNOPS_C_ABI={C_ABI_VERSION}"] + isa_flags
sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
archs = cuda_archs() if with_cuda else []

if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DALIGNOPS_WITH_CUDA"]
    nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext = CUDAExtension(
        "alignops._C", sources,
        extra_compile_args={"cxx": cxx_flags + ["-DALIGNOPS_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension("alignops._C", sources, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=["-fopenmp"])

build_info = {
    "c_abi": C_ABI_VERSION,
    "torch": torch.__version__,
    "cuda": with_cuda,
    "cuda_version": torch.version.cuda if with_cuda else None,
    "cuda_archs": archs,
    "cpu_isa": isa,
    "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}
with open(os.path.join(HERE, "alignops", "_build_info.json"), "w") as f:
    json.dump(build_info, f, indent=1)

setup(
    packages=find_packages(include=["alignops", "alignops.*"]) + ["alignops.kernels"],
    # Triton kernels live at the top-level kernels/ folder but install as alignops.kernels, so no
    # top-level module named `kernels` is ever installed.
    package_dir={"alignops": "alignops", "alignops.kernels": "kernels"},
    package_data={"alignops": ["_build_info.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
