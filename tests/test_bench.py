"""The benchmark runner's promises: the parity gate bites (non-zero exit, no speedup printed), the last stdout
line is one JSON document with the required keys, results are appended to the history, and the GEMM floor replay
gives positive times. Runs on a small-vocabulary checkpoint so it stays fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import measure
from benchmarks.floor import Floor, Gemm, run_gemms
from benchmarks.run import main
from nemotron_fast.sampling import GenerationResult

ROW_KEYS = {"model", "params_m", "prompt", "prompt_tokens", "max_tokens", "block_length", "threshold", "steps",
            "sampler", "policy", "batch", "completion_tokens", "nfe", "tokens_per_s", "tokens_per_forward",
            "nfe_per_block", "split_s", "peak_mem_mib", "accuracy", "floor_s", "floor_ratio",
            "speedup_vs_reference", "time_s"}
ENV_KEYS = {"cpu", "cores", "torch", "triton", "git_sha", "date", "torch_threads"}


@pytest.fixture(autouse=True)
def _keep_threads():
    """The runner sets torch's thread count; give the rest of the test session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_ckpts")


def _argv(tmp: Path, ckpt_dir: Path, *extra: str) -> list[str]:
    return ["--models", "small-h64", "--prompts", "text", "--max-tokens", "12", "--block-lengths", "8",
            "--thresholds", "0.9", "--batches", "1", "--policies", "", "--reps", "1", "--threads", "1",
            "--ckpt-dir", str(ckpt_dir), "--out", str(tmp / "out"), "--history", str(tmp / "history.jsonl"),
            "--no-plot", *extra]


def test_run_prints_table_and_json_last_line(tmp_path: Path, ckpt_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_argv(tmp_path, ckpt_dir, "--policies", "finish_last_step", "--write-readme-table",
                      str(tmp_path / "table.md"))) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert doc["status"] == "ok"
    assert ENV_KEYS <= set(doc["env"])
    samplers = [r["sampler"] for r in doc["rows"]]
    assert samplers == ["reference", "fast", "fast:finish_last_step"]
    for row in doc["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert set(row["split_s"]) == {"vision", "prefill", "denoise", "select", "commit"}
        assert row["tokens_per_s"] > 0 and row["floor_s"] > 0 and row["floor_ratio"] > 0
    fast = doc["rows"][1]
    assert fast["parity"] == "exact" and fast["speedup_vs_reference"] > 0
    assert doc["rows"][2]["speedup_vs_reference"] is None  # a different algorithm: no speedup claim
    assert any("tok/s" in line for line in out[:-1])  # the table
    history = (tmp_path / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["rows"] == doc["rows"]
    table = (tmp_path / "table.md").read_text()
    assert "| reference |" in table and "| fast |" in table and doc["env"]["date"][:10] in table


def test_parity_failure_exits_nonzero_without_speedup(tmp_path: Path, ckpt_dir: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = measure.fast_generate

    def corrupted(*args, **kwargs) -> GenerationResult:
        res = real(*args, **kwargs)
        res.completion_ids[0][0] += 1
        return res

    monkeypatch.setattr(measure, "fast_generate", corrupted)
    assert main(_argv(tmp_path, ckpt_dir)) == 1
    captured = capsys.readouterr()
    text = (captured.out + captured.err).lower()
    assert "parity failure" in text
    assert "speedup" not in text and "tok/s" not in text
    doc = json.loads(captured.out.strip().splitlines()[-1])
    assert doc["status"] == "parity_failure" and doc["rows"] == []
    assert json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])["status"] == "parity_failure"


def test_floor_replay_positive(ckpt_dir: Path) -> None:
    from benchmarks.matrix import MODELS, model_path
    from nemotron_fast.config import load_config

    cfg = load_config(model_path(MODELS["small-h64"], ckpt_dir))
    # two blocks of 4: step reveals (block 0: 2 then 1 masks; block 1: all 3), then the two commits
    res = GenerationResult(completion_ids=[[1] * 8], nfe=5, trace=[[[1, 2]], [[3]], [[5, 6, 7]]])
    gemms = run_gemms(cfg, res, rows=1, prompt_len=10, block_length=4)
    t = cfg.text
    head = {g: c for g, c in gemms.items() if g.n == t.vocab_size}
    # head rows: prefill 1, steps 3 + 1 + 3 masked rows, commits 1 each
    assert head == {Gemm(0, 1, t.hidden_size, t.vocab_size): 4, Gemm(0, 3, t.hidden_size, t.vocab_size): 2}
    attn = [g for g in gemms if g.attn]
    # per layer: prefill over 10 keys, each step and commit of block b over 10 + 4 (b + 1) keys
    assert {(g.m, g.n) for g in attn} == {(10, 10), (4, 14), (4, 18)}
    floor = Floor(gemms, torch.float32, "cpu", repeats=2)
    first, second = floor.measure(), floor.measure()
    assert first > 0 and second > 0 and floor.flops > 0


def test_plain_pytest_does_not_collect_benchmarks() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    root = Path(__file__).resolve().parent.parent
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
