"""Build script: the Python package always, the CUDA extension ``nemotron_fast._C`` only when it can be built.

``kernels/`` is installed as ``nemotron_fast.kernels`` (PyPI's ``kernels`` package owns the top-level name).
Environment flags: ``NEMOTRON_FAST_SKIP_CUDA=1`` never builds the extension, ``NEMOTRON_FAST_FORCE_CUDA=1``
makes a failed build an error instead of a warning.
"""

import os
import shutil
import warnings

from setuptools import find_packages, setup

# Machine code for Ampere (sm_80) and Hopper (sm_90), plus compute_90 PTX that newer GPUs JIT-compile.
NVCC_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("NEMOTRON_FAST_SKIP_CUDA") == "1":
        return [], {}
    force = os.environ.get("NEMOTRON_FAST_FORCE_CUDA") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env
        if force:
            raise
        warnings.warn(f"nemotron_fast: torch not importable at build time ({exc}); skipping the CUDA extension",
                      stacklevel=1)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None:
        if force:
            raise RuntimeError("NEMOTRON_FAST_FORCE_CUDA=1 but torch has no CUDA or nvcc is not on PATH")
        warnings.warn("nemotron_fast: torch without CUDA or no nvcc found; the CUDA extension is not built",
                      stacklevel=1)
        return [], {}
    ext = CUDAExtension(
        name="nemotron_fast._C",
        sources=["csrc/bindings.cpp", "csrc/select_unmask.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *NVCC_ARCH_FLAGS]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
packages = find_packages(include=["nemotron_fast", "nemotron_fast.*"]) + ["nemotron_fast.kernels"]

setup(
    packages=packages,
    package_dir={"nemotron_fast.kernels": "kernels"},
    package_data={"nemotron_fast": ["demo/assets/**/*", "server/static/*", "py.typed"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
