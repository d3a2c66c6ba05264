"""Load benchmark: ``nemotron-fast bench --serve`` (or ``python -m benchmarks.load``, the same options).

A seeded open-loop client against a real ``nemotron-fast serve`` process, once per batching mode (``static``:
the worker claims up to ``--max-batch`` queued requests and runs them as one batch; ``continuous``: rows join
and leave at block boundaries). Per model, in order:

1. **Expected answers.** Each distinct request (a pool of ``--distinct`` mixed requests: demo scenes asked for a
   description or one question, filler sentences for the Tekken-vocabulary checkpoints, ``max_tokens`` and
   ``block_length`` drawn from the lists) runs through :meth:`nemotron_fast.pipeline.Pipeline.run` in this
   process, on the server's device and dtype.
2. **Per batching mode**: a server on a fresh data dir; a warm-up burst of every distinct request at once; then,
   per rate, ``--requests`` arrivals at times drawn up front from a seeded exponential (Poisson arrivals; the same
   schedule for every mode). A request is sent at its time whether or not earlier ones finished. Each client
   submits to the queue, follows the status stream (with logs) and fetches the result.
3. **Checked answers.** Every answer (warm-up and timed) must equal its request's direct ``Pipeline.run`` output
   (text and usage: prompt tokens, completion tokens, function evaluations), or the run prints
   ``ANSWER MISMATCH``, no timing at all, a JSON line with ``"status": "answer_mismatch"``, and exits 1.

Columns: completion tokens/s (all completion tokens of a rate's requests over the time from the first arrival to
the last completion), latency percentiles (arrival to the COMPLETED status event; the server's status stream
polls every 0.1 s, the resolution of that event), time to first block (arrival to the server's timestamp of the
request's first ``Block 1 committed`` log line; a request whose batch reports no blocks counts its completion),
and the mean number of requests in flight (Little's law: summed latency over the run's duration).

The server is started with ``--batching static|continuous`` when ``serve --help`` lists that flag; a server
without it runs as ``static`` only, and the continuous rows are reported missing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadSettings", "Sample", "AnswerMismatch", "ServerError", "build_requests", "arrival_schedule",
           "direct_answer", "batching_flag_supported", "ServerProcess", "run_schedule", "check_answers", "summarise",
           "compare", "format_table", "write_plot", "run_load", "settings_from_args", "run_from_bench_args", "main"]

BATCHINGS = ("static", "continuous")
APP_ID = "fal-ai/nemotron-diffusion-vlm"
# the worker's per-block log line ("Block 1 committed (...)"); the pipeline's own "block 1/N committed" also counts
_FIRST_BLOCK = re.compile(r"^block 1\b.*committed", re.IGNORECASE)
_FILLER = "A red circle sits left of a blue square on a white background, and a green triangle is to the right. "
STATUS_POLL_S = 0.1  # the server's status stream checks for changes this often


def _log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class LoadSettings:
    """Everything one load benchmark run needs; the defaults are the CLI's."""

    models: list[str] = field(default_factory=lambda: ["demo", "tekken-h64"])
    rates: list[float] = field(default_factory=lambda: [2.0, 8.0, 32.0])
    requests: int = 64
    distinct: int = 24
    seed: int = 0
    batchings: list[str] = field(default_factory=lambda: list(BATCHINGS))
    max_batch: int = 16
    clients: int = 16
    max_tokens: list[int] = field(default_factory=lambda: [16, 64, 128])
    block_lengths: list[int] = field(default_factory=lambda: [8])
    thresholds: list[float] = field(default_factory=lambda: [0.9])
    device: str = "cpu"
    dtype: str = "float32"
    threads: str = "auto"
    demo_model: Path | None = None
    ckpt_dir: Path | None = None
    out: Path | None = None
    plot: bool = True
    history: Path | None = None
    server_timeout: float = 300.0
    request_timeout: float = 600.0

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        from .matrix import MODELS

        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"unknown model {m!r} (use one of {', '.join(MODELS)})")
        if not self.models:
            raise ValueError("--models is empty")
        if not self.rates or any(not (r > 0 and math.isfinite(r)) for r in self.rates):
            raise ValueError(f"--rates must be finite request rates > 0 per second, got {self.rates}")
        for name in ("requests", "distinct", "max_batch", "clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        bad = [b for b in self.batchings if b not in BATCHINGS]
        if bad or not self.batchings:
            raise ValueError(f"--batching takes a comma list of {', '.join(BATCHINGS)}, got {self.batchings}")
        if not self.max_tokens or any(m < 1 for m in self.max_tokens):
            raise ValueError(f"--max-tokens must be integers >= 1, got {self.max_tokens}")
        if not self.block_lengths or any(b < 1 for b in self.block_lengths):
            raise ValueError(f"--block-lengths must be integers >= 1, got {self.block_lengths}")
        if not self.thresholds or any(t is None or not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"--thresholds must lie in [0, 1] (the endpoint has no 'none'), got {self.thresholds}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.threads != "auto" and not (self.threads.isdigit() and int(self.threads) >= 1):
            raise ValueError(f"--threads must be an integer >= 1 or 'auto', got {self.threads!r}")


class AnswerMismatch(Exception):
    """A server answer differs from the same request's direct ``Pipeline.run`` output (or failed)."""


class ServerError(RuntimeError):
    """The server process exited or did not answer ``/health`` in time."""


# ---- the requests ---------------------------------------------------------------------------------------------
def _data_uri(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_requests(model_name: str, settings: LoadSettings) -> list[dict[str, Any]]:
    """The pool of distinct requests for ``model_name``: demo scenes (held-out split) asked for a description or
    one of their questions; for other checkpoints, 0-3 filler sentences before the question (mixed prompt
    lengths). ``max_tokens``, ``block_length`` and ``threshold`` are drawn from the settings' lists."""
    from nemotron_fast.demo.scenes import make_scene, scene_seed

    rng = random.Random(f"load-requests:{settings.seed}:{model_name}")
    pool = []
    for i in range(settings.distinct):
        scene = make_scene(scene_seed("eval", settings.seed, i))
        question = "Describe the image." if i % 2 == 0 or not scene.qa else rng.choice(scene.qa).question
        if model_name != "demo":
            question = _FILLER * rng.randrange(4) + question
        req: dict[str, Any] = {"image_url": _data_uri(scene.image), "prompt": question,
                               "max_tokens": rng.choice(settings.max_tokens),
                               "block_length": rng.choice(settings.block_lengths)}
        req["threshold"] = rng.choice(settings.thresholds)
        pool.append(req)
    return pool


def arrival_schedule(rate: float, n: int, pool_size: int, seed: int) -> list[tuple[float, int]]:
    """``n`` (arrival offset in s, pool index) pairs: exponential gaps of mean ``1/rate`` (Poisson arrivals), the
    first at 0, drawn up front from a generator seeded by ``seed`` and ``rate`` (same for every batching)."""
    rng = random.Random(f"load-arrivals:{seed}:{rate!r}")
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append((t, rng.randrange(pool_size)))
    return out


def direct_answer(pipeline: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The answer the server must give for ``inputs``: the direct ``Pipeline.run`` output's text and usage."""
    out = pipeline.run(dict(inputs))
    return {"output": out["output"], "usage": out["usage"]}


# ---- the server -----------------------------------------------------------------------------------------------
def _serve_cmd() -> list[str]:
    return [sys.executable, "-m", "nemotron_fast.server", "serve"]


def batching_flag_supported() -> bool:
    """Whether ``nemotron-fast serve --help`` lists ``--batching`` (the serve parser, built in this process)."""
    from nemotron_fast.server.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="nemotron-fast")
    serve = add_serve_parser(parser.add_subparsers())
    return re.search(r"--batching\b", serve.format_help()) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``nemotron-fast serve`` in a subprocess on 127.0.0.1 and a fresh data dir; a context manager."""

    def __init__(self, model: Path, settings: LoadSettings, batching: str | None, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._tmp = tempfile.TemporaryDirectory(prefix="nemotron-load-")
        self.cmd = [*_serve_cmd(), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "--data-dir", self._tmp.name, "--max-batch", str(settings.max_batch), "--device",
                    settings.device, "--dtype", settings.dtype, "--log-level", "warning"]
        if batching is not None:
            self.cmd += ["--batching", batching]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if settings.threads != "auto":
            self.env["OMP_NUM_THREADS"] = settings.threads
        self.timeout = settings.server_timeout
        self.proc: subprocess.Popen | None = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def start(self) -> ServerProcess:
        """Launch the process (returns at once; :meth:`wait_ready` waits for ``/health``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self) -> ServerProcess:
        """Wait until ``/health`` answers 200; raises :class:`ServerError` (with the log's tail) when the process
        exits or the timeout passes first."""
        import httpx

        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the server did not answer /health within {self.timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._tmp.cleanup()


# ---- the client ------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One request as the client saw it; times are ``time.time()`` seconds (same clock as the server's logs)."""

    pool_index: int
    arrival: float
    first_block: float | None = None
    done: float | None = None
    status_code: int | None = None
    answer: dict[str, Any] | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        assert self.done is not None
        return self.done - self.arrival

    @property
    def ttfb(self) -> float:
        """Arrival to the first block (the completion when the server logged no block)."""
        end = self.first_block if self.first_block is not None else self.done
        assert end is not None
        return end - self.arrival


def _log_time(entry: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


async def _one(client: Any, inputs: dict[str, Any], sample: Sample) -> None:
    base = f"/queue/{APP_ID}"
    r = await client.post(base, json=inputs)
    if r.status_code != 200:
        sample.status_code, sample.error = r.status_code, f"submit answered {r.status_code}: {r.text[:500]}"
        return
    rid = r.json()["request_id"]
    completed = False
    async with client.stream("GET", f"{base}/requests/{rid}/status/stream", params={"logs": 1}) as resp:
        if resp.status_code != 200:
            sample.status_code, sample.error = resp.status_code, f"status stream answered {resp.status_code}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            for entry in event.get("logs") or []:
                if sample.first_block is None and _FIRST_BLOCK.match(str(entry.get("message", ""))):
                    sample.first_block = _log_time(entry) or time.time()
            if event.get("status") == "COMPLETED":
                sample.done = time.time()
                completed = True
                break
    if not completed:
        sample.error = "the status stream ended before COMPLETED"
        return
    res = await client.get(f"{base}/requests/{rid}")
    sample.status_code = res.status_code
    body = res.json()
    if res.status_code != 200:
        sample.error = f"result answered {res.status_code}: {json.dumps(body)[:500]}"
        return
    sample.answer = {"output": body.get("output"), "usage": body.get("usage")}


async def _schedule(url: str, pool: list[dict[str, Any]], arrivals: list[tuple[float, int]],
                    timeout: float) -> list[Sample]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout, connect=30)) as client:
        t0 = time.time()
        samples: list[Sample] = []
        tasks = []
        for offset, index in arrivals:
            delay = t0 + offset - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sample = Sample(index, t0 + offset)  # open loop: the scheduled time, even when the client runs late
            samples.append(sample)
            tasks.append(asyncio.create_task(asyncio.wait_for(_one(client, pool[index], sample), timeout)))
        for task, sample in zip(tasks, samples):
            try:
                await task
            except Exception as exc:  # a timeout or a transport error is this request's failure
                sample.error = f"{type(exc).__name__}: {exc}"
        return samples


def run_schedule(url: str, pool: list[dict[str, Any]], arrivals: list[tuple[float, int]], *,
                 timeout: float = 600.0) -> list[Sample]:
    """Send ``pool[index]`` at each ``(offset, index)`` of ``arrivals`` to the server at ``url``, concurrently."""
    return asyncio.run(_schedule(url, pool, arrivals, timeout))


def check_answers(label: str, samples: list[Sample], expected: list[dict[str, Any]],
                  pool: list[dict[str, Any]]) -> None:
    """Raise :class:`AnswerMismatch` on the first sample that failed or differs from its expected answer."""
    for i, s in enumerate(samples):
        want = expected[s.pool_index]
        if s.error is not None or s.answer != want:
            shown = {k: v for k, v in pool[s.pool_index].items() if k != "image_url"}
            got = s.error if s.error is not None else json.dumps(s.answer)
            raise AnswerMismatch(f"{label}: request {i} (pool #{s.pool_index}, {json.dumps(shown)[:300]})\n"
                                 f"  server: {got[:800]}\n  direct Pipeline.run: {json.dumps(want)[:800]}")


# ---- results ----------------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (numpy's default method)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _peak_in_flight(samples: list[Sample]) -> int:
    events = sorted([(s.arrival, 1) for s in samples] + [(s.done, -1) for s in samples if s.done is not None])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def summarise(model: str, batching: str, rate: float, samples: list[Sample], *, flag: bool,
              max_batch: int) -> dict[str, Any]:
    """One result row from a rate's (checked) samples."""
    lat = [s.latency for s in samples]
    ttfb = [s.ttfb for s in samples]
    start = min(s.arrival for s in samples)
    duration = max(s.done for s in samples if s.done is not None) - start
    tokens = sum(int(s.answer["usage"]["completion_tokens"]) for s in samples if s.answer)
    row: dict[str, Any] = {
        "model": model, "batching": batching, "server_flag": flag, "max_batch": max_batch, "rate": rate,
        "requests": len(samples), "completion_tokens": tokens, "duration_s": round(duration, 4),
        "tokens_per_s": tokens / duration if duration > 0 else None,
        "requests_per_s": len(samples) / duration if duration > 0 else None,
        "mean_in_flight": sum(lat) / duration if duration > 0 else None,
        "peak_in_flight": _peak_in_flight(samples),
        "ttfb_from_block_log": sum(s.first_block is not None for s in samples) / len(samples),
    }
    for q in (50, 95, 99):
        row[f"latency_p{q}_s"] = _pct(lat, q)
        row[f"ttfb_p{q}_s"] = _pct(ttfb, q)
    return row


def compare(rows: list[dict[str, Any]], clients: int) -> list[dict[str, Any]]:
    """Per model and rate: continuous / static throughput and p95 latency ratios (where both ran); the row at
    ``clients`` concurrent clients (the first rate whose static run had that many requests in flight on mean,
    else the highest rate) carries ``goal``: continuous >= 2x static throughput with p95 latency no worse."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for rate in sorted({r["rate"] for r in mine}):
            s = next((r for r in mine if r["rate"] == rate and r["batching"] == "static"), None)
            c = next((r for r in mine if r["rate"] == rate and r["batching"] == "continuous"), None)
            entry: dict[str, Any] = {"model": model, "rate": rate,
                                     "static_mean_in_flight": s["mean_in_flight"] if s else None,
                                     "throughput_ratio": None, "p95_ratio": None, "goal": None}
            if s and c and s["tokens_per_s"] and c["tokens_per_s"]:
                entry["throughput_ratio"] = c["tokens_per_s"] / s["tokens_per_s"]
                entry["p95_ratio"] = c["latency_p95_s"] / s["latency_p95_s"]
            out.append(entry)
        mine_cmp = [e for e in out if e["model"] == model]
        at = next((e for e in mine_cmp if (e["static_mean_in_flight"] or 0) >= clients), mine_cmp[-1])
        if at["throughput_ratio"] is not None:
            at["goal"] = {"clients": clients, "reached_clients": (at["static_mean_in_flight"] or 0) >= clients,
                          "met": at["throughput_ratio"] >= 2.0 and at["p95_ratio"] <= 1.0}
    return out


_COLUMNS = [("model", "model", "s"), ("batching", "batching", "s"), ("rate/s", "rate", "g"),
            ("req", "requests", "d"), ("in flight", "mean_in_flight", ".1f"), ("peak", "peak_in_flight", "d"),
            ("tok/s", "tokens_per_s", ".1f"), ("lat p50", "latency_p50_s", ".3f"), ("p95", "latency_p95_s", ".3f"),
            ("p99", "latency_p99_s", ".3f"), ("TTFB p50", "ttfb_p50_s", ".3f"), ("p95", "ttfb_p95_s", ".3f"),
            ("p99", "ttfb_p99_s", ".3f"), ("blk log", "ttfb_from_block_log", ".0%")]


def format_table(rows: list[dict[str, Any]], comparison: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table (times in seconds), then one ratio line per model and rate."""
    head = [c[0] for c in _COLUMNS]
    body = [["-" if r.get(k) is None else format(r[k], spec) for _, k, spec in _COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    for e in comparison:
        if e["throughput_ratio"] is None:
            lines.append(f"{e['model']} @ {e['rate']:g}/s: continuous vs static: - (only one batching mode ran)")
            continue
        line = (f"{e['model']} @ {e['rate']:g}/s: continuous / static throughput {e['throughput_ratio']:.2f}x, "
                f"p95 latency {e['p95_ratio']:.2f}x")
        if e["goal"] is not None:
            g = e["goal"]
            line += (f" | goal at {g['clients']} concurrent clients (continuous >= 2x static, p95 no worse): "
                     f"{'met' if g['met'] else 'not met'}"
                     + ("" if g["reached_clients"] else f" (static mean in flight only "
                                                        f"{e['static_mean_in_flight']:.1f}; raise --rates)"))
        lines.append(line)
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Completion tokens/s, p95 latency and p50 time to first block against the offered rate: colour =
    batching, marker = model. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install nemotron-fast[bench])", file=sys.stderr)
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    markers = {m: "osD^v<>ph*"[i % 10] for i, m in enumerate(models)}
    colours = {b: f"C{i}" for i, b in enumerate(BATCHINGS)}
    panels = [("tokens_per_s", "completion tokens / s"), ("latency_p95_s", "p95 latency (s)"),
              ("ttfb_p50_s", "p50 time to first block (s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.8))
    for ax, (key, label) in zip(axes, panels):
        for m in models:
            for b in BATCHINGS:
                sel = sorted((r for r in rows if r["model"] == m and r["batching"] == b), key=lambda r: r["rate"])
                if sel:
                    ax.plot([r["rate"] for r in sel], [r[key] for r in sel], marker=markers[m], color=colours[b],
                            label=f"{m} {b}", alpha=0.85)
        rates = sorted({r["rate"] for r in rows})
        ax.set(xlabel="offered load (requests / s, Poisson)", ylabel=label, xscale="log")
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 160)), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the run ----------------------------------------------------------------------------------------------------
def _bench_model(name: str, settings: LoadSettings, modes: list[tuple[str, str | None]], log_dir: Path,
                 progress: Callable[[str], None]) -> list[dict[str, Any]]:
    from nemotron_fast.pipeline import Pipeline

    from .matrix import MODELS, model_path

    path = model_path(MODELS[name], settings.ckpt_dir, settings.demo_model)
    pool = build_requests(name, settings)
    servers = [ServerProcess(path, settings, flag, log_dir / f"server-{name}-{batching}.log")
               for batching, flag in modes]
    servers[0].start()  # loads while the expected answers are computed
    try:
        progress(f"model {name}: {path}; {len(pool)} distinct requests, expected answers from Pipeline.run")
        pipeline = Pipeline.from_pretrained(path, device=settings.device, dtype=getattr(torch, settings.dtype))
        # looked up at call time, so a test can swap ``direct_answer``
        expected = [globals()["direct_answer"](pipeline, req) for req in pool]
        del pipeline
    except BaseException:
        servers[0].__exit__()
        raise
    rows = []
    for (batching, flag), server in zip(modes, servers):
        with server:
            progress(f"model {name}, {batching}: server up at {server.url} ({shlex.join(server.cmd[2:])}); warm-up")
            warm = run_schedule(server.url, pool, [(0.0, i) for i in range(len(pool))],
                                timeout=settings.request_timeout)
            check_answers(f"{name}/{batching}/warm-up", warm, expected, pool)
            for rate in settings.rates:
                arrivals = arrival_schedule(rate, settings.requests, len(pool), settings.seed)
                progress(f"model {name}, {batching}: {len(arrivals)} requests at {rate:g}/s")
                samples = run_schedule(server.url, pool, arrivals, timeout=settings.request_timeout)
                check_answers(f"{name}/{batching}/rate {rate:g}", samples, expected, pool)
                rows.append(summarise(name, batching, rate, samples, flag=flag is not None,
                                      max_batch=settings.max_batch))
    return rows


def run_load(settings: LoadSettings) -> tuple[int, dict[str, Any]]:
    """Run the load benchmark; returns the exit status (0, 1 on an answer mismatch) and the JSON document (also
    printed as the last stdout line)."""
    from .matrix import demo_path
    from .report import RESULTS_DIR, append_history, environment, hardware_line

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if settings.threads != "auto":
        torch.set_num_threads(int(settings.threads))
    env = environment(torch.device(settings.device))
    env["threads_choice"] = settings.threads
    flag = batching_flag_supported()
    modes: list[tuple[str, str | None]] = [(b, b if flag else None) for b in settings.batchings
                                           if flag or b == "static"]
    notes = []
    if not flag:
        notes.append("this server has no --batching flag: it runs as 'static'; no continuous rows")
    demo = demo_path(settings.demo_model)
    settings.demo_model = demo
    models = [m for m in settings.models if not (m == "demo" and demo is None)]
    if len(models) < len(settings.models):
        notes.append("demo model not installed: its rows are skipped")
    for note in notes:
        _log(note)
    out_dir = settings.out or RESULTS_DIR / "latest-serve"
    doc: dict[str, Any] = {"status": "ok", "preset": "serve", "env": env, "notes": notes, "batching_flag": flag,
                           "settings": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in asdict(settings).items()},
                           "resolution_s": STATUS_POLL_S}
    history = settings.history
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if not modes:
        print("error: --batching continuous needs a server with the --batching flag", file=sys.stderr)
        return 2, {**doc, "status": "bad_arguments"}
    try:
        for name in models:
            rows += _bench_model(name, settings, modes, out_dir, _log)
    except AnswerMismatch as exc:
        print(f"ANSWER MISMATCH - a server answer differs from the direct Pipeline.run output; no timing is "
              f"reported.\n{exc}")
        doc.update(status="answer_mismatch", error=str(exc), rows=[])
        if history is not None:
            append_history(history, doc)
        print(json.dumps(doc, sort_keys=True))
        return 1, doc
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        doc.update(status="server_failure", error=str(exc), rows=[])
        print(json.dumps(doc, sort_keys=True))
        return 1, doc
    comparison = compare(rows, settings.clients)
    doc.update(rows=rows, comparison=comparison, wall_s=round(time.perf_counter() - t0, 1))
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(f"# {hardware_line(env)}")
    print(format_table(rows, comparison))
    if settings.plot and rows:
        plot = write_plot(rows, out_dir / "load.png", f"nemotron-fast bench --serve: {hardware_line(env)}")
        doc["plot"] = str(plot) if plot else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    if history is not None:
        append_history(history, doc)
    print(json.dumps(doc, sort_keys=True))
    return 0, doc


# options of ``nemotron-fast bench`` that belong to the sampler benchmark only (refused with --serve)
_SAMPLER_ONLY = ("quick", "prompts", "steps", "policies", "batches", "reps", "eval_n", "write_readme_table")


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    """The settings of ``nemotron-fast bench --serve ...`` (unset options keep :class:`LoadSettings`' defaults);
    raises ``ValueError`` on options of the sampler benchmark or bad values."""
    given = [f"--{k.replace('_', '-')}" for k in _SAMPLER_ONLY if getattr(args, k, None) not in (None, False)]
    if getattr(args, "preset", "full") != "full":
        given.append("--preset")
    if given:
        raise ValueError(f"{', '.join(given)} belong to the sampler benchmark, not to --serve")
    s = LoadSettings()
    for arg, attr in (("models", "models"), ("rates", "rates"), ("requests", "requests"), ("distinct", "distinct"),
                      ("seed", "seed"), ("batching", "batchings"), ("max_batch", "max_batch"),
                      ("clients", "clients"), ("max_tokens", "max_tokens"), ("block_lengths", "block_lengths"),
                      ("thresholds", "thresholds"), ("dtype", "dtype"), ("demo_model", "demo_model"),
                      ("ckpt_dir", "ckpt_dir"), ("out", "out")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(s, attr, value)
    s.device = getattr(args, "device", None) or s.device
    s.threads = str(getattr(args, "threads", "auto"))
    s.plot = not getattr(args, "no_plot", False)
    from .report import RESULTS_DIR

    s.history = None if getattr(args, "no_history", False) else (getattr(args, "history", None)
                                                                   or RESULTS_DIR / "history.jsonl")
    s.check()
    return s


def run_from_bench_args(args: argparse.Namespace) -> int:
    """Entry of ``nemotron-fast bench --serve``: the exit status (0 ok, 1 answer mismatch, 2 bad arguments)."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_load(settings)[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.load [options]``: ``nemotron-fast bench --serve [options]``."""
    from nemotron_fast.bench import add_bench_arguments

    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_from_bench_args(args)


if __name__ == "__main__":
    sys.exit(main())
