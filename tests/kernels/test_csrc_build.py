"""csrc/: the CUDA kernel compiles with plain nvcc (no torch headers) for every architecture setup.py names (sm_80,
sm_90 and compute_90 PTX), the torch glue passes a syntax check against the installed torch headers, and the glue's
C++ signature follows the Python-defined schema."""

from __future__ import annotations

import ast
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
SETUP = CSRC.parent / "setup.py"


def _setup_arch_flags() -> list[str]:
    # setup.py runs setup() on import, so read its NVCC_ARCH_FLAGS literal instead.
    for node in ast.parse(SETUP.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "NVCC_ARCH_FLAGS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_ARCH_FLAGS")


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


def test_setup_builds_sm80_sm90_and_compute90_ptx():
    flags = _setup_arch_flags()
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
    assert '"nvcc": ["-O3", *NVCC_ARCH_FLAGS]' in SETUP.read_text()


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_every_setup_arch(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH, in CUDA_HOME or /usr/local/cuda")
    cmd = [nvcc, "-c", *_setup_arch_flags(), "-O3", "-std=c++17", "-Werror", "all-warnings", "-I", str(CSRC),
           str(cu), "-o", str(tmp_path / f"{cu.stem}.o"), "--keep", "--keep-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / f"{cu.stem}.o").stat().st_size > 0
    # machine code for both architectures, and the PTX that goes into the fatbinary targets sm_90
    assert (tmp_path / f"{cu.stem}.compute_80.cubin").stat().st_size > 0
    assert (tmp_path / f"{cu.stem}.compute_90.sm_90.cubin").stat().st_size > 0
    ptx = (tmp_path / f"{cu.stem}.compute_90.ptx").read_text()
    assert re.search(r"^\.target\s+sm_90\b", ptx, re.M), ptx[:400]
    assert "select_unmask_kernel" in ptx
    # what nvcc packs into the object's fatbinary: sm_80 and sm_90 ELF images plus sm_90 PTX, nothing else
    dry = subprocess.run([*cmd[:-3], "--dryrun"], capture_output=True, text=True, timeout=120)
    images = sorted(set(re.findall(r"image3=kind=(elf|ptx),sm=(\d+)", dry.stdout + dry.stderr)))
    assert images == [("elf", "80"), ("elf", "90"), ("ptx", "90")], images


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
