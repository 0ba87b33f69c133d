"""Builds alignops._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Install with `pip install --no-build-isolation .` (or `-e .`, or `pip wheel --no-build-isolation`)
so the extension is built against the torch already in the environment; the wheel then requires
that torch release exactly. An sdist needs no torch to be made.
"""

import datetime
import glob
import json
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Making an sdist (and the egg_info pip asks for first) needs no torch; everything that builds or
# describes a wheel does, since the wheel's dependencies name the torch it was compiled against.
SOURCE_ONLY = {"sdist", "egg_info", "clean", "--help", "--help-commands", "--version"}
try:
    import torch
except ImportError:
    if not set(sys.argv[1:]) & SOURCE_ONLY:
        sys.exit("alignops builds its C++ extension against the torch of the environment it will run in, "
                 "and found none here. Install torch first, then build without isolation: "
                 "`pip install --no-build-isolation .` (an isolated build would compile against another "
                 "torch, downloaded for the build, and the extension would not load in yours).")
    torch = None
# Bumped whenever the C++ op signatures change, so a stale _C is detected at import.
C_ABI_VERSION = 4


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
    anything else the default level. ALIGNOPS_CPU_ISAS=default (comma-separated) builds fewer, for
    a quick build that will only run where that level is chosen."""
    env = os.environ.get("ALIGNOPS_CPU_ISAS")
    if env:
        isas = [s.strip() for s in env.split(",") if s.strip()]
        unknown = sorted(set(isas) - set(ISA_FLAGS))
        if unknown or "default" not in isas:
            sys.exit(f"ALIGNOPS_CPU_ISAS={env!r}: must list 'default' and only levels of {sorted(ISA_FLAGS)}")
        return isas
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


def extensions():
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
        exts = [CUDAExtension(
            "alignops._C", c_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": c_flags + ["-DALIGNOPS_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp", "-ldl"])]
    else:
        exts = [CppExtension("alignops._C", c_sources, extra_compile_args={"cxx": c_flags},
                             extra_link_args=["-fopenmp", "-ldl"])]
    # One kernel library per level. Hidden visibility: each exports only alignops_cpu_kernel_table.
    for isa in isas:
        exts.append(CppExtension(
            f"alignops._cpu_{isa}", sorted(glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args={"cxx": base_flags + ISA_FLAGS[isa] + [
                "-fvisibility=hidden", "-fvisibility-inlines-hidden", f"-DALIGNOPS_CPU_ISA_NAME={isa}"]},
            extra_link_args=["-fopenmp"]))

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
    return exts


def torch_requirement() -> str:
    """The release the extension is compiled against, without its local build tag: torch's C++ ABI
    changes between releases, so _C loads only in the torch release it was built with."""
    return "torch==" + torch.__version__.split("+", 1)[0]


if torch is not None:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    class BuildExtensions(BuildExtension):
        """Each extension compiles into its own folder: the ISA libraries share source files, and one
        folder would make their objects overwrite each other. The folders live under build/ in the
        tree, one set per torch and Python, so the editable install, `pip wheel` and a rebuild after
        an edit share objects (ninja recompiles only what changed) instead of each compiling all of
        it in a throwaway temp folder."""

        def build_extension(self, ext):
            temp = self.build_temp
            tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
            self.build_temp = os.path.join(HERE, "build", f"objects-{tag}", ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = temp

    build_args = dict(ext_modules=extensions(), install_requires=[torch_requirement(), "numpy"],
                      cmdclass={"build_ext": BuildExtensions.with_options(use_ninja=True)})
else:  # an sdist: sources only
    build_args = dict(install_requires=["torch", "numpy"])

setup(
    packages=find_packages(include=["alignops", "alignops.*"]) + ["alignops.kernels"],
    # Triton kernels live at the top-level kernels/ folder but install as alignops.kernels, so no
    # top-level module named `kernels` is ever installed.
    package_dir={"alignops": "alignops", "alignops.kernels": "kernels"},
    package_data={"alignops": ["_build_info.json", "py.typed"]},
    **build_args,
)
