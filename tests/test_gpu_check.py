"""The one-shot device check: its dry run end to end (what CI runs), and the imports it needs on a device image
without mistral-common, OpenCV or FastAPI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKED_IMPORTS = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("mistral_common", "cv2", "fastapi")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked (not on the device image)")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Block())
    import nemotron_fast
    from nemotron_fast import reference, testing
    from nemotron_fast.model import NLDModel
    from nemotron_fast.hf_twin import TwinModel
    from nemotron_fast.kernels.unmask import select_unmask
    from nemotron_fast import _ops
    import benchmarks.gpu.check, benchmarks.run, benchmarks.measure, benchmarks.floor
    nemotron_fast.load, nemotron_fast.generate
    try:
        import mistral_common
    except ImportError:
        print("blocked-ok")
""")


def test_package_and_check_import_without_mistral_common_cv2_fastapi():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "blocked-ok"


@pytest.mark.slow
def test_run_sh_dry_run_writes_json_and_prints_one_table_last(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    for stage in ("env", "build", "tests", "kernels", "samplers", "summary"):
        assert (out / f"{stage}.json").is_file(), stage
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    for stage in ("env", "build", "tests", "kernels", "samplers"):
        assert stages[stage].get("ok", True) and "error" not in stages[stage], (stage, stages[stage])
    samplers = stages["samplers"]
    assert samplers["gate"]["ok"], samplers["gate"]
    assert [r["batch"] for r in samplers["rows"]] == [1, 2, 4]
    for r in samplers["rows"]:
        assert r["ok"], r
        # same algorithm in fp32 on the CPU: every compared token agrees, and the NFE is the reference's
        assert r["agreement"] == 1.0
        if r["ref_tokens"] == r["new_tokens"]:
            assert r["nfe"] == r["ref_nfe"] and r["nfe_within_1pct"]
        assert r["forwards"] == r["nfe"] + 1
        assert r["measured_over_floor"] > 0
    kernels = stages["kernels"]
    assert kernels["head"] and all(h["same_tokens"] for h in kernels["head"])
    # the table is the last thing printed, and it is the one summary.json holds
    assert proc.stdout.rstrip().endswith(summary["table"].rstrip())
    table = summary["table"]
    assert "| samplers | ok |" in table and "fp32 gate: exact" in table
    assert table.count("\n| 1 |") + table.count("\n| 2 |") + table.count("\n| 4 |") >= 3
