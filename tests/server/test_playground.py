"""The playground page in a real browser (Debian's Chromium driven by Playwright), and the opt-in step stream.

The browser tests run the server on the embedded demo model and the bundled example scene. They need
``/usr/bin/chromium`` (``apt-get install chromium``; another binary: ``NEMOTRON_FAST_CHROMIUM``) and the
``playwright`` package; without them they are skipped, except in CI (``CI=true``), where that is a failure.
Screenshots go to ``$NEMOTRON_FAST_ARTIFACTS`` (default: the test's tmp dir); the path is printed.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nemotron_fast.demo import example_image_path, example_qa

CHROMIUM = os.environ.get("NEMOTRON_FAST_CHROMIUM", "/usr/bin/chromium")
APP = "fal-ai/nemotron-diffusion-vlm"
WAIT_MS = 120_000  # generous upper bound for a page state on a loaded 2-core box (never a sleep)


def example_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(example_image_path().read_bytes()).decode()


@pytest.fixture(scope="module")
def demo_pipeline() -> Any:
    """The real pipeline on the embedded demo model, CPU, one torch thread."""
    import torch

    from nemotron_fast.pipeline import Pipeline

    torch.set_num_threads(1)
    return Pipeline.from_pretrained(None, device="cpu")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; skipped when it (or playwright) is missing, except in CI where that fails."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).is_file():
        missing = "the playwright package" if sync_playwright is None else CHROMIUM
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {missing} is missing: .ci/run installs Chromium and the test extra")
        pytest.skip(f"{missing} is missing (apt-get install -y chromium; pip install -e '.[test]')")
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        chrome = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chrome
        chrome.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("NEMOTRON_FAST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_page(browser: Any, server: Any, **context: Any) -> Any:
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-state=ready]")
    return page


def choose_example(page: Any) -> None:
    """Upload the bundled example through the file picker."""
    page.set_input_files("#file", str(example_image_path()))
    page.wait_for_function("document.getElementById('image-source').textContent.includes('example.png')")


def api_run(server: Any, inputs: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Key {key}"} if key else {}
    resp = httpx.post(f"{server.url}/{APP}", json=inputs, headers=headers, timeout=WAIT_MS / 1000)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_page_shows_the_reveal_and_the_api_answer(browser: Any, start_server: Any, demo_pipeline: Any,
                                                   artifacts: Path) -> None:
    server = start_server(demo_pipeline)
    page = open_page(browser, server)
    assert page.url == f"{server.url}/playground"  # "/" redirects to the page
    choose_example(page)
    page.fill("#prompt", example_qa()["description_prompt"])
    page.fill("#block_length", "8")
    page.click("#run")
    page.wait_for_selector("body[data-state=done]")

    answer = page.inner_text("#answer")
    api = api_run(server, {"image_url": example_uri(), "prompt": example_qa()["description_prompt"],
                           "block_length": 8})
    assert answer == api["output"] == example_qa()["description"]
    assert page.inner_text("#nfe") == str(api["usage"]["num_function_evals"])
    steps = int(page.inner_text("#steps-seen"))
    assert steps >= 2  # the live view drew at least two denoise steps

    # the replay walks every step: one label per step, the last one the committed final block
    page.wait_for_selector("#replay:not([hidden])")
    last = int(page.get_attribute("#replay-step", "max"))
    assert last > steps  # denoise steps and commits
    labels = []
    page.fill("#replay-step", "0")
    for k in range(1, last + 1):
        page.click("#replay-next")
        labels.append(page.inner_text("#replay-label"))
        assert page.input_value("#replay-step") == str(k)
    assert len(set(labels)) == last and labels[-1].startswith(f"Step {last} of {last}: commit")
    assert sum(": denoise of" in label for label in labels) == steps
    assert page.locator("#block .slot.committed").count() == 8
    assert page.inner_text("#answer") == answer

    # the first step: nothing committed yet, the first block partly revealed
    page.fill("#replay-step", "1")
    revealed = page.locator("#block .slot:not(.masked)").count()
    assert 1 <= revealed and revealed + page.locator("#block .slot.masked").count() == 8
    assert page.inner_text("#answer") == ""
    # a mid-run picture: the first step of the second block, the first block's text committed above it
    mid = 1 + next(i for i, label in enumerate(labels) if "denoise of block 2" in label)
    page.fill("#replay-step", str(mid))
    assert page.inner_text("#answer") and answer.startswith(page.inner_text("#answer"))
    shot = artifacts / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(artifacts / "playground-phone.png"), full_page=True)
    print(f"screenshots: {shot} and {artifacts / 'playground-phone.png'}")


class HoldAtFirstStep:
    """The demo pipeline, held after its first step event until the request is cancelled: a run the page can
    cancel mid-way whatever the machine's speed."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.held = threading.Event()

    def validate(self, inputs: dict[str, Any]) -> Any:
        return self.pipeline.validate(inputs)

    def run_batch(self, *args: Any, **kwargs: Any) -> Any:
        return self.pipeline.run_batch(*args, **kwargs)

    def run(self, inputs: dict[str, Any], *, should_cancel: Any = None, on_step: Any = None, **kwargs: Any) -> Any:
        assert on_step is not None and should_cancel is not None

        def step(record: dict[str, Any]) -> None:
            on_step(record)
            if not self.held.is_set():
                self.held.set()
                wait = threading.Event()
                for _ in range(int(WAIT_MS / 10)):  # waits on the cancel flag, bounded
                    if should_cancel():
                        return
                    wait.wait(0.01)
                raise AssertionError("the page never cancelled")

        return self.pipeline.run(inputs, should_cancel=should_cancel, on_step=step, **kwargs)


def test_cancel_from_the_page(browser: Any, start_server: Any, demo_pipeline: Any) -> None:
    server = start_server(HoldAtFirstStep(demo_pipeline))
    page = open_page(browser, server)
    choose_example(page)
    page.fill("#max_tokens", "64")
    page.fill("#block_length", "8")
    page.click("#run")
    page.wait_for_function("Number(document.getElementById('steps-seen').textContent) >= 1")
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    page.wait_for_selector("body[data-state=cancelled]")
    request_id = page.get_attribute("body", "data-request-id")
    status = httpx.get(f"{server.url}/queue/{APP}/requests/{request_id}/status", timeout=30).json()
    assert (status["status"], status["error_type"]) == ("COMPLETED", "request_cancelled")
    assert "Cancelled" in page.inner_text("#status") and page.is_enabled("#run")


def test_api_key_from_the_page(browser: Any, start_server: Any, demo_pipeline: Any) -> None:
    server = start_server(demo_pipeline, api_key="page-secret")
    page = open_page(browser, server)  # the page itself needs no key
    choose_example(page)
    page.click("#run")
    page.wait_for_selector("body[data-state=error]")
    error = page.inner_text("#error")
    assert "401 Unauthorized" in error and "API key" in error
    page.fill("#api-key", "page-secret")
    page.click("#run")
    page.wait_for_selector("body[data-state=done]")
    inputs = {"image_url": example_uri(), "prompt": page.input_value("#prompt")}
    assert page.inner_text("#answer") == api_run(server, inputs, key="page-secret")["output"]


# ---- the step stream, without a browser -----------------------------------------------------------------------
def sse(server: Any, path: str) -> list[dict[str, Any]]:
    with httpx.stream("GET", f"{server.url}{path}", timeout=WAIT_MS / 1000) as resp:
        assert resp.status_code == 200
        return [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]


def test_ordinary_requests_run_exactly_as_before(start_server: Any, demo_pipeline: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``stream_steps`` the sampler is called without ``on_step`` and the output is the pipeline's own;
    with it, the same output and a step stream that rebuilds it."""
    gen = importlib.import_module("nemotron_fast.generate")
    calls: list[dict[str, Any]] = []
    real = gen.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    server = start_server(demo_pipeline)
    inputs = {"image_url": example_uri(), "prompt": "Describe the image.", "block_length": 8}
    direct = demo_pipeline.run(dict(inputs))
    plain = httpx.post(f"{server.url}/queue/{APP}", json=inputs, timeout=30).json()
    streamed = httpx.post(f"{server.url}/queue/{APP}", json={**inputs, "stream_steps": True}, timeout=30).json()
    events = sse(server, f"/queue/{APP}/requests/{streamed['request_id']}/steps")
    results = [httpx.get(sub["response_url"], timeout=30).json() for sub in (plain, streamed)]
    # the direct run and the streamed request call the sampler (only the latter with on_step); the plain request
    # runs on the server's Engine, which has no step hook at all
    assert [("on_step" in kw) for kw in calls] == [False, True]
    assert server.service.worker.engine.forwards > 0
    assert results[0]["output"] == results[1]["output"] == direct["output"]
    assert results[0]["usage"] == results[1]["usage"] == direct["usage"]
    # the ordinary request recorded nothing and has no step stream
    assert server.service.steps.read(plain["request_id"]) == []
    resp = httpx.get(f"{server.url}/queue/{APP}/requests/{plain['request_id']}/steps", timeout=30)
    assert resp.status_code == 400 and "stream_steps" in resp.json()["detail"]
    assert "stream_steps" not in json.dumps(httpx.get(f"{server.url}/openapi.json", timeout=30).json())

    steps = [e for e in events if e["type"] == "step"]
    assert events[-1]["type"] == "done" and events[-1]["status_code"] == 200
    assert [e["forwards"] for e in steps] == list(range(1, direct["usage"]["num_function_evals"] + 1))
    committed = [tok for e in steps if e["kind"] == "commit" for _, tok, _, _ in e["slots"]]
    assert demo_pipeline.processor.decode(committed) == direct["output"]
    assert [e["output"] for e in events if e["type"] == "output"][-1] == direct["output"]
    for e in steps:
        if e["kind"] == "denoise":
            assert all(0 <= i < 8 and 0.0 <= c <= 1.0 and text == demo_pipeline.processor.decode([tok])
                       for i, tok, text, c in e["slots"])


def test_a_step_streamed_request_leaves_its_batch(start_server: Any, demo_pipeline: Any, tmp_path: Path) -> None:
    """Queued together, the request with ``stream_steps`` runs alone with ``on_step``, the others as one batch."""
    from nemotron_fast.server.store import RequestStore

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int, bool]] = []

        def validate(self, inputs: dict[str, Any]) -> Any:
            return demo_pipeline.validate(inputs)

        def run(self, inputs: dict[str, Any], **kwargs: Any) -> Any:
            self.calls.append(("run", 1, kwargs.get("on_step") is not None))
            return demo_pipeline.run(inputs, **kwargs)

        def run_batch(self, inputs: list[dict[str, Any]], **kwargs: Any) -> Any:
            self.calls.append(("run_batch", len(inputs), False))
            return demo_pipeline.run_batch(inputs, **kwargs)

    base = {"image_url": example_uri(), "block_length": 8}
    prompts = ["Describe the image.", "What colour is the square?", "How many shapes are there?"]
    (tmp_path / "data").mkdir()  # the data dir start_server uses: queue the requests before the worker runs
    store = RequestStore(tmp_path / "data" / "requests.sqlite3")
    ids = [store.submit({**base, "prompt": p, **({"stream_steps": True} if i == 1 else {})})[0]
           for i, p in enumerate(prompts)]
    store.close()
    recorder = Recorder()
    server = start_server(recorder)  # the worker claims the three queued requests at once
    for request_id, prompt in zip(ids, prompts):
        assert sse(server, f"/queue/{APP}/requests/{request_id}/status/stream")[-1]["status"] == "COMPLETED"
        got = httpx.get(f"{server.url}/queue/{APP}/requests/{request_id}", timeout=30).json()
        assert got["output"] == demo_pipeline.run({**base, "prompt": prompt})["output"]
    assert sorted(recorder.calls) == [("run", 1, True), ("run_batch", 2, False)]
    assert server.service.worker.batch_sizes == [3]


def test_step_stream_refuses_unknown_requests(fake_server: Any) -> None:
    resp = httpx.get(f"{fake_server.url}/queue/{APP}/requests/nope/steps", timeout=30)
    assert resp.status_code == 404


def test_other_modes_stream_the_growing_answer_only(start_server: Any, demo_pipeline: Any) -> None:
    server = start_server(demo_pipeline)
    inputs = {"image_url": example_uri(), "prompt": "Describe the image.", "mode": "ar", "stream_steps": True,
              "max_tokens": 24, "block_length": 8}
    sub = httpx.post(f"{server.url}/queue/{APP}", json=inputs, timeout=30).json()
    events = sse(server, f"/queue/{APP}/requests/{sub['request_id']}/steps")
    result = httpx.get(sub["response_url"], timeout=30).json()
    assert {e["type"] for e in events} == {"status", "output", "done"}
    # the answer grows (the page shows the result's full text once the request is done)
    outputs = [e["output"] for e in events if e["type"] == "output"]
    assert outputs and all(result["output"].startswith(text) for text in outputs)
    assert all(len(a) < len(b) for a, b in zip(outputs, outputs[1:]))


def test_the_step_stream_reaches_another_api_process(demo_pipeline: Any, tmp_path: Any) -> None:
    """On a shared PostgreSQL store, a page on an API process (no model) streams the steps a worker recorded."""
    from nemotron_fast.server.service import ServerConfig

    from .conftest import LiveServer
    from .pg import fresh_database

    with fresh_database() as url:
        worker = LiveServer(demo_pipeline, ServerConfig(data_dir=tmp_path / "w", store=url, role="worker")).start()
        api = LiveServer(None, ServerConfig(data_dir=tmp_path / "a", store=url, role="api")).start()
        try:
            inputs = {"image_url": example_uri(), "prompt": "Describe the image.", "block_length": 8,
                      "stream_steps": True}
            sub = httpx.post(f"{api.url}/queue/{APP}", json=inputs, timeout=30).json()
            events = sse(api, f"/queue/{APP}/requests/{sub['request_id']}/steps")
            result = httpx.get(f"{api.url}/queue/{APP}/requests/{sub['request_id']}", timeout=30).json()
        finally:
            api.stop()
            worker.stop()
    steps = [e for e in events if e["type"] == "step"]
    assert len([e for e in steps if e["kind"] == "denoise"]) >= 2 and events[-1]["type"] == "done"
    assert [e["forwards"] for e in steps] == list(range(1, result["usage"]["num_function_evals"] + 1))
    assert [e for e in events if e["type"] == "output"][-1]["output"] == result["output"]
