"""Builds alignops._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Install with `pip install -e . --no-build-isolation` so the build uses the torch already in the
environment (an isolated build env would download a CUDA torch of several GB).
"""

import datetime
import glob
import json
import os
import platform
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))
# Bumped whenever the C++ op signatures change, so a stale _C is detected at import.
C_ABI_VERSION = 3


# The CPU kernels (csrc/cpu/) are compiled once per level into alignops/_cpu_<isa>*.so, and
# alignops._C opens the one the CPU supports at load (csrc/cpu_isa.cpp). at::vec picks its
# Vectorized specialisation from the CPU_CAPABILITY_* macros, not from -m flags, so both are set.
# F16C: torch's AVX2/AVX-512 vector headers convert halves with _cvtss_sh.
ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def cpu_isas():
    """Every level this architecture has (never only the build machine's): x86-64 builds all three,
    anything else the default level."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["default", "avx2", "avx512"]
    return ["default"]


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


isas = cpu_isas()
with_cuda = want_cuda()
# -ffp-contract=off: with FMA available GCC would fuse `x * inv_temp - max` into one fma, so z_y - max
# is no longer computed from the same rounded z as max itself (a 1e-4 error at |z| ~ 1000).
base_flags = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
archs = cuda_archs() if with_cuda else []

# alignops._C: the torch.library bindings, the ISA loader and the CUDA kernels; no ISA flags.
c_flags = base_flags + [f"-DALIGNOPS_C_ABI={C_ABI_VERSION}", f"-DALIGNOPS_CPU_ISAS={','.join(isas)}"]
c_sources = ["csrc/bindings.cpp", "csrc/cpu_isa.cpp"]
if with_cuda:
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DALIGNOPS_WITH_CUDA"]
    nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc_flags += ["-gencode=arch=compute_90,code=compute_90"]  # PTX, so newer GPUs JIT it
    extensions = [CUDAExtension(
        "alignops._C", c_sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": c_flags + ["-DALIGNOPS_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp", "-ldl"])]
else:
    extensions = [CppExtension("alignops._C", c_sources, extra_compile_args={"cxx": c_flags},
                               extra_link_args=["-fopenmp", "-ldl"])]
# One kernel library per level. Hidden visibility: each exports only alignops_cpu_kernel_table.
for isa in isas:
    extensions.append(CppExtension(
        f"alignops._cpu_{isa}", sorted(glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args={"cxx": base_flags + ISA_FLAGS[isa] + [
            "-fvisibility=hidden", "-fvisibility-inlines-hidden", f"-DALIGNOPS_CPU_ISA_NAME={isa}"]},
        extra_link_args=["-fopenmp"]))


class BuildExtensions(BuildExtension):
    """Each extension compiles into its own temp folder: the ISA libraries share source files, and
    one folder would make their objects overwrite each other."""

    def build_extension(self, ext):
        temp = self.build_temp
        self.build_temp = os.path.join(temp, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = temp


build_info = {
    "c_abi": C_ABI_VERSION,
    "torch": torch.__version__,
    "cuda": with_cuda,
    "cuda_version": torch.version.cuda if with_cuda else None,
    "cuda_archs": archs,
    "cpu_isas": isas,
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
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtensions.with_options(use_ninja=True)},
)
