"""The load benchmark's promises (``nemotron-fast bench --serve``, ``benchmarks/load.py``): end to end against a
real server process on the demo model, the JSON document, table and plot have their structure; a server answer
that differs from the direct ``Pipeline.run`` output makes it refuse to report; the arrival schedule is seeded;
the statistics are the documented ones. No wall-clock assertions: timings are only checked for consistency."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import load
from benchmarks.matrix import demo_path
from benchmarks.run import main as run_main
from nemotron_fast.cli import main as cli_main

ROW_KEYS = {"model", "batching", "server_flag", "max_batch", "rate", "requests", "completion_tokens", "duration_s",
            "tokens_per_s", "requests_per_s", "mean_in_flight", "peak_in_flight", "ttfb_from_block_log",
            "latency_p50_s", "latency_p95_s", "latency_p99_s", "ttfb_p50_s", "ttfb_p95_s", "ttfb_p99_s"}

needs_demo = pytest.mark.skipif(demo_path() is None, reason="the demo checkpoint is not installed")


@pytest.fixture(autouse=True)
def _keep_threads():
    """The runner may set torch's thread count; give the rest of the test session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _argv(tmp: Path, *extra: str) -> list[str]:
    return ["--serve", "--models", "demo", "--rates", "20,50", "--requests", "4", "--distinct", "3",
            "--max-tokens", "16,32", "--threads", "1", "--out", str(tmp / "out"),
            "--history", str(tmp / "history.jsonl"), *extra]


@needs_demo
def test_end_to_end_table_json_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert load.main(_argv(tmp_path)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert doc["status"] == "ok" and doc["preset"] == "serve"
    modes = ["static", "continuous"] if doc["batching_flag"] else ["static"]
    assert [(r["batching"], r["rate"]) for r in doc["rows"]] == [(m, r) for m in modes for r in (20.0, 50.0)]
    for row in doc["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["model"] == "demo" and row["requests"] == 4 and row["server_flag"] == doc["batching_flag"]
        assert row["completion_tokens"] > 0 and row["tokens_per_s"] > 0 and 1 <= row["peak_in_flight"] <= 4
        assert row["latency_p50_s"] <= row["latency_p95_s"] <= row["latency_p99_s"]
        assert row["ttfb_p50_s"] <= row["ttfb_p95_s"] <= row["ttfb_p99_s"]
        assert row["ttfb_p99_s"] <= row["latency_p99_s"] + 1e-9  # the first block never comes after completion
    assert [(c["model"], c["rate"]) for c in doc["comparison"]] == [("demo", 20.0), ("demo", 50.0)]
    if doc["batching_flag"]:
        assert all(c["throughput_ratio"] > 0 for c in doc["comparison"])
    else:
        assert all(c["throughput_ratio"] is None for c in doc["comparison"])
    assert any("tok/s" in line and "TTFB p50" in line for line in out[:-1])  # the table
    assert Path(doc["plot"]).is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == doc["rows"]
    assert json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])["rows"] == doc["rows"]


@needs_demo
def test_wrong_expected_answer_refuses_to_report(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = load.direct_answer
    calls = []

    def wrong(pipeline: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        answer = real(pipeline, inputs)
        calls.append(answer)
        if len(calls) == 2:  # one request of the pool: its expected text gains a character
            answer = {**answer, "output": answer["output"] + "!"}
        return answer

    monkeypatch.setattr(load, "direct_answer", wrong)
    assert load.main(_argv(tmp_path, "--batching", "static", "--no-plot")) == 1
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert doc["status"] == "answer_mismatch" and doc["rows"] == []
    assert "pool #1" in doc["error"]
    assert out[0].startswith("ANSWER MISMATCH")
    assert not any("tok/s" in line for line in out[:-1])  # no timing at all
    assert json.loads((tmp_path / "history.jsonl").read_text())["status"] == "answer_mismatch"


def test_arrivals_are_seeded_poisson_schedules() -> None:
    a = load.arrival_schedule(4.0, 200, 7, seed=3)
    assert a == load.arrival_schedule(4.0, 200, 7, seed=3)
    assert a != load.arrival_schedule(4.0, 200, 7, seed=4)
    assert a[0][0] == 0.0 and all(t1 > t0 for (t0, _), (t1, _) in zip(a, a[1:]))
    assert {i for _, i in a} <= set(range(7))
    # the gaps are the seeded exponential draws, in order
    rng = random.Random("load-arrivals:3:4.0")
    t = 0.0
    for k, (offset, index) in enumerate(a):
        if k:
            t += rng.expovariate(4.0)
        assert offset == t and index == rng.randrange(7)


def test_statistics_and_comparison() -> None:
    lat = [0.5, 1.0, 2.0, 4.0, 8.0]
    samples = [load.Sample(i % 2, arrival=float(i), done=float(i) + x,
                           first_block=float(i) + x / 2 if i % 2 else None,
                           answer={"output": "x", "usage": {"completion_tokens": 10 + i}})
               for i, x in enumerate(lat)]
    row = load.summarise("m", "static", 1.0, samples, flag=False, max_batch=4)
    assert row["completion_tokens"] == 60
    assert math.isclose(row["duration_s"], 12.0)  # first arrival 0, last completion 4 + 8
    assert math.isclose(row["tokens_per_s"], 5.0) and math.isclose(row["mean_in_flight"], sum(lat) / 12.0)
    assert row["latency_p50_s"] == 2.0 and math.isclose(row["latency_p95_s"], 4.0 + 0.8 * 4.0)
    ttfb = sorted([0.5, 0.5, 2.0, 2.0, 8.0])  # odd rows: half their latency; even rows: their completion
    assert row["ttfb_p50_s"] == ttfb[2] and row["ttfb_from_block_log"] == 2 / 5
    assert row["peak_in_flight"] == 2  # a completion at the instant of an arrival leaves first
    fast = dict(row, batching="continuous", tokens_per_s=11.0, latency_p95_s=row["latency_p95_s"] * 0.5)
    [cmp] = load.compare([row, fast], clients=2)
    assert math.isclose(cmp["throughput_ratio"], 2.2) and math.isclose(cmp["p95_ratio"], 0.5)
    assert cmp["goal"] == {"clients": 2, "reached_clients": False, "met": True}
    assert "goal at 2 concurrent clients" in load.format_table([row, fast], [cmp])


def test_cli_refuses_mixed_options(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["bench", "--rates", "1,2"]) == 2
    assert "--rates belong to the load benchmark" in capsys.readouterr().err
    assert cli_main(["bench", "--serve", "--reps", "3"]) == 2
    assert "--reps belong to the sampler benchmark" in capsys.readouterr().err
    assert cli_main(["bench", "--serve", "--rates", "0"]) == 2
    assert "--rates must be" in capsys.readouterr().err
    assert cli_main(["bench", "--serve", "--batching", "dynamic"]) == 2
    assert "--batching takes" in capsys.readouterr().err
    assert run_main(["--requests", "3", "--seed", "1"]) == 2  # python -m benchmarks.run: the same refusal
    assert "--requests, --seed belong to the load benchmark" in capsys.readouterr().err
