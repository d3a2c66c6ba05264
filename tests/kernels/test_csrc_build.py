"""csrc/: the CUDA kernel compiles for sm_90 with plain nvcc (no torch headers), the torch glue passes a syntax
check against the installed torch headers, and the glue's C++ signature follows the Python-defined schema."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from nemotron_fast import _ops

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = _nvcc()
    if nvcc is not None:
        roots.insert(0, str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


def test_cuda_sources_exist_and_setup_names_them():
    assert [p.name for p in CU_FILES] == ["select_unmask.cu"]
    setup = (CSRC.parent / "setup.py").read_text()
    assert '"csrc/bindings.cpp", "csrc/select_unmask.cu"' in setup


def test_cuda_kernel_needs_no_torch_headers():
    for path in [*CU_FILES, CSRC / "select_unmask.h"]:
        includes = re.findall(r"#include\s+[<\"]([^>\"]+)[>\"]", path.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")], (path.name, includes)


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm90(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH, in CUDA_HOME or /usr/local/cuda")
    cmd = [nvcc, "-c", "-arch=sm_90", "-O3", "-std=c++17", "-Werror", "all-warnings", "-I", str(CSRC),
           str(cu), "-o", str(tmp_path / f"{cu.stem}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / f"{cu.stem}.o").stat().st_size > 0


@pytest.mark.slow
def test_bindings_cpp_passes_a_syntax_check():
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_include = _cuda_include()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers")
    torch_include = Path(torch.__file__).parent / "include"
    # A CPU-only torch wheel ships the c10/cuda headers but not their generated config header.
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-isystem", str(torch_include), "-isystem", str(torch_include / "torch/csrc/api/include"),
           "-isystem", str(cuda_include), "-isystem", sysconfig.get_paths()["include"], "-I", str(CSRC),
           str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"


def test_cuda_impl_signature_follows_the_schema():
    # The dispatcher checks this only when the extension loads on a GPU machine; keep the two in step here.
    cpp_types = {"Tensor": "const at::Tensor&", "Tensor(a!)": "const at::Tensor&",
                 "Tensor(b!)": "const at::Tensor&", "Tensor?": "const std::optional<at::Tensor>&",
                 "float?": "std::optional<double>", "bool": "bool"}
    args = re.search(r"\((.*)\)\s*->", _ops.SELECT_UNMASK_SCHEMA).group(1)
    schema = [(a.split()[0], a.split()[1].split("=")[0]) for a in args.split(", ")]
    source = (CSRC / "bindings.cpp").read_text()
    params = re.search(r"at::Tensor select_unmask_cuda\((.*?)\)\s*\{", source, re.S).group(1)
    cpp = [" ".join(p.split()) for p in params.split(",")]
    assert [f"{cpp_types[t]} {n}" for t, n in schema] == cpp
    assert 'm.impl("select_unmask", &nemotron_fast::select_unmask_cuda)' in source
