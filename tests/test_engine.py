"""The serving engine: continuous batching at block boundaries with every request equal to its run alone,
short requests overtaking long ones, failures isolated per request, abort and streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch

import nemotron_fast
from nemotron_fast.engine import Engine, EngineOutput, EngineRequest

from .helpers import text_prompt, vlm_prompt

HEAD_SCALE = 8.0


@pytest.fixture(scope="module")
def model(ckpt_factory):
    return nemotron_fast.load(ckpt_factory(vlm=True, vocab="small", seed=5, head_scale=HEAD_SCALE))


def _solo(model, r: EngineRequest):
    return nemotron_fast.generate(model, torch.as_tensor(r.input_ids).view(1, -1), r.pixel_values, r.image_sizes,
                                  max_new_tokens=r.max_new_tokens, block_length=r.block_length, steps=r.steps,
                                  threshold=r.threshold, temperature=r.temperature, seed=r.seed,
                                  eos_token_id=r.eos_token_id, mode=r.mode)


def _mixed(model, n: int) -> list[EngineRequest]:
    out = []
    for i in range(n):
        length = (8, 12, 5)[i % 3]
        max_tokens = 9 + 7 * (i % 5)
        blocks = -(-max_tokens // length)
        spb = (1, 2, 3, length + 2)[i % 4]
        pix = sizes = None
        if i % 5 == 3:
            ids, pix, sizes = vlm_prompt(model.config, i, n_text=4 + i % 3)
        else:
            ids = text_prompt(model.config, i, 4 + 3 * (i % 6))
        mode = {7: "ar", 13: "linear_spec"}.get(i, "diffusion")
        out.append(EngineRequest(ids[0], max_tokens, length, blocks * spb if mode == "diffusion" else None,
                                 (0.9, 0.5, None, 0.0, 1.0)[i % 5], temperature=0.8 if i % 6 == 5 else 0.0,
                                 seed=100 + i, mode=mode, pixel_values=pix, image_sizes=sizes,
                                 request_id=f"r{i}"))
    return out


def test_mixed_concurrent_requests_equal_their_runs_alone(model) -> None:
    """22 requests (prompt and completion lengths, block lengths 5/8/12, thresholds incl. None, steps per block
    1..L+2, T = 0 and 0.8, images, one ar and one linear_spec) through 4 slots: ids and NFE as run alone."""
    reqs = _mixed(model, 22)
    eng = Engine(model, max_batch=4)
    ids = [eng.submit(r) for r in reqs]
    outs = {i: eng.result(i) for i in ids}
    assert eng.max_rows_per_forward > 1, "rows must really share forwards"
    for r in reqs:
        solo = _solo(model, r)
        o = outs[r.request_id]
        assert o.finished and o.finish_reason in ("stop", "length") and o.error is None
        assert (o.token_ids, o.nfe) == (solo.completion_ids[0], solo.nfe), r.request_id


def test_eos_stops_a_row_alone(model) -> None:
    """Rows with their own EOS ids, one of which fires mid-block, still equal their runs alone."""
    base = [EngineRequest(text_prompt(model.config, s, 7)[0], 30, 8, 4 * 3, 0.5, request_id=f"e{s}")
            for s in range(3)]
    free = _solo(model, base[1]).completion_ids[0]
    eos = next(t for t in free[9:] if t != model.config.mask_token_id)
    reqs = [base[0], EngineRequest(base[1].input_ids, 30, 8, 4 * 3, 0.5, eos_token_id=eos, request_id="eos"),
            base[2]]
    eng = Engine(model, max_batch=3)
    for r in reqs:
        eng.submit(r)
    outs = {r.request_id: eng.result(r.request_id) for r in reqs}
    assert outs["eos"].finish_reason == "stop" and outs["eos"].token_ids[-1] == eos
    for r in reqs:
        solo = _solo(model, r)
        assert (outs[r.request_id].token_ids, outs[r.request_id].nfe) == (solo.completion_ids[0], solo.nfe)


def test_a_short_request_overtakes_long_ones(model) -> None:
    """Submitted while two long requests run, a short one is admitted at the next block boundary and finishes
    in less than half the engine rounds the long ones still need (rounds counted, not seconds)."""
    eng = Engine(model, max_batch=4)
    for s in range(2):
        eng.submit(EngineRequest(text_prompt(model.config, s, 9)[0], 64, 8, 8 * 4, 0.99, request_id=f"long{s}"))
    for _ in range(2):
        eng.step()
    eng.submit(EngineRequest(text_prompt(model.config, 9, 6)[0], 8, 8, 4, 0.99, request_id="short"))
    done: dict[str, int] = {}
    rounds = 0
    while eng.has_work():
        rounds += 1
        for out in eng.step():
            if out.finished:
                done[out.request_id] = rounds
    assert set(done) == {"long0", "long1", "short"}
    assert done["short"] < min(done["long0"], done["long1"]) / 2


def test_a_failing_row_fails_alone(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose admission raises (an image without sizes) and one whose every denoise step raises fail
    alone, with their errors; their batch-mates' results equal their runs alone."""
    reqs = _mixed(model, 6)
    poison_admit = EngineRequest(reqs[3].input_ids, 10, 8, None, 0.9, pixel_values=reqs[3].pixel_values,
                                 request_id="bad-image")
    poison_step = EngineRequest(text_prompt(model.config, 50, 8)[0], 20, 8, None, 0.9, request_id="poison")
    real = Engine._denoise

    def denoise(self, rows, *args, **kwargs):
        if any(r.rid == "poison" for r in rows):
            raise RuntimeError("poisoned row")
        return real(self, rows, *args, **kwargs)

    monkeypatch.setattr(Engine, "_denoise", denoise)
    eng = Engine(model, max_batch=8)
    for r in [*reqs[:3], poison_admit, poison_step, *reqs[3:]]:
        eng.submit(r)
    outs = {r: eng.result(r) for r in ["bad-image", "poison"] + [r.request_id for r in reqs]}
    assert outs["bad-image"].finish_reason == "error" and "image_sizes" in str(outs["bad-image"].error)
    assert outs["poison"].finish_reason == "error" and "poisoned row" in str(outs["poison"].error)
    assert eng.max_rows_per_forward > 1
    for r in reqs:
        solo = _solo(model, r)
        assert (outs[r.request_id].token_ids, outs[r.request_id].nfe) == (solo.completion_ids[0], solo.nfe)


def test_abort_frees_the_slot_at_the_next_block(model) -> None:
    eng = Engine(model, max_batch=1)
    eng.submit(EngineRequest(text_prompt(model.config, 1, 6)[0], 64, 8, 8 * 8, 1.0, request_id="a"))
    eng.submit(EngineRequest(text_prompt(model.config, 2, 6)[0], 8, 8, 2, 0.9, request_id="b"))
    first = eng.step()
    assert [o.request_id for o in first] == ["a"] and not first[0].finished
    assert eng.abort("a") and not eng.abort("nope")
    outs = eng.step()
    assert outs[0].request_id == "a" and outs[0].finish_reason == "abort"
    b = eng.result("b")
    assert b.token_ids == _solo(model, EngineRequest(text_prompt(model.config, 2, 6)[0], 8, 8, 2, 0.9)
                                ).completion_ids[0]


def test_bad_requests_are_refused_at_submit(model) -> None:
    eng = Engine(model)
    ids = text_prompt(model.config, 1, 5)[0]
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(threshold=1.5), "threshold"),
                       (dict(mode="beam"), "mode"), (dict(input_ids=[]), "input_ids"),
                       (dict(steps=3, max_new_tokens=16, block_length=8), "steps")):
        kw = dict(input_ids=ids, max_new_tokens=8) | bad
        with pytest.raises(ValueError, match=match):
            eng.submit(EngineRequest(**kw))
    eng.submit(EngineRequest(ids, 8, request_id="x"))
    with pytest.raises(ValueError, match="already in use"):
        eng.submit(EngineRequest(ids, 8, request_id="x"))
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, max_batch=0)


def test_background_thread_streams_blocks_to_an_event_loop(model) -> None:
    """start() + async iteration: every block arrives in order, the last output is the final one, and it equals
    the run alone; a solo request runs with no neighbour."""
    eng = Engine(model, max_batch=4)
    eng.start()
    try:
        reqs = [EngineRequest(text_prompt(model.config, s, 8)[0], 24, 8, 3 * 2, 0.9, request_id=f"s{s}",
                              solo=s == 2) for s in range(4)]

        async def consume(r: EngineRequest) -> list[EngineOutput]:
            return [o async for o in eng.stream(r)]

        async def main() -> list[list[EngineOutput]]:
            return await asyncio.gather(*(consume(r) for r in reqs))

        streams = asyncio.run(main())
    finally:
        eng.stop()
    for r, outs in zip(reqs, streams):
        solo = _solo(model, r)
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert sum((o.new_token_ids for o in outs[:-1]), []) == outs[-2].token_ids
        assert (outs[-1].token_ids, outs[-1].nfe) == (solo.completion_ids[0], solo.nfe)


def test_a_solo_request_runs_with_no_neighbour(model) -> None:
    """A solo request (one that crashed a worker before) waits for an empty engine and keeps it to itself; the
    requests behind it wait in order."""
    eng = Engine(model, max_batch=4)
    mk = lambda rid, s, solo=False: EngineRequest(text_prompt(model.config, s, 6)[0], 16, 8, 4, 0.9,  # noqa: E731
                                                  request_id=rid, solo=solo)
    for r in (mk("a", 1), mk("s", 2, solo=True), mk("b", 3)):
        eng.submit(r)
    seen: list[set[str]] = []
    while eng.has_work():
        seen.append({o.request_id for o in eng.step()})
    firsts = [next(i for i, ids in enumerate(seen) if rid in ids) for rid in ("a", "s", "b")]
    lasts = [max(i for i, ids in enumerate(seen) if rid in ids) for rid in ("a", "s", "b")]
    assert lasts[0] < firsts[1] and lasts[1] < firsts[2], seen
    assert eng.max_rows_per_forward == 1


def test_a_raising_callback_loses_no_other_output(model) -> None:
    """A callback that raises (its consumer is gone) is its own request's problem: the round still delivers the
    other requests' outputs, and the engine goes on."""
    reqs = [EngineRequest(text_prompt(model.config, s, 6)[0], 16, 8, 4, 0.9, request_id=f"c{s}") for s in range(2)]

    def gone(out: EngineOutput) -> None:
        raise RuntimeError("consumer gone")

    got: list[EngineOutput] = []
    eng = Engine(model, max_batch=2)
    eng.submit(reqs[0], on_output=gone)
    eng.submit(reqs[1], on_output=got.append)
    while eng.has_work():
        eng.step()
    assert got and got[-1].finished
    solo = _solo(model, reqs[1])
    assert (got[-1].token_ids, got[-1].nfe) == (solo.completion_ids[0], solo.nfe)


def test_a_stream_left_early_frees_its_slot_and_the_thread_goes_on(model) -> None:
    """A consumer that stops iterating and whose event loop then closes: its request is aborted (the one slot is
    free again) and the engine's thread serves the next request."""
    eng = Engine(model, max_batch=1)
    eng.start()
    try:
        long = EngineRequest(text_prompt(model.config, 1, 6)[0], 64, 8, 8 * 8, 1.0, request_id="long")

        async def first() -> EngineOutput:
            async for out in eng.stream(long):
                return out
            raise AssertionError("no output")

        assert not asyncio.run(first()).finished
        after = EngineRequest(text_prompt(model.config, 2, 6)[0], 8, 8, 2, 0.9, request_id="after")
        eng.submit(after)
        out = eng.result("after", timeout=600)
    finally:
        eng.stop()
    assert out.token_ids == _solo(model, after).completion_ids[0]


def test_start_after_a_timed_out_stop_never_runs_two_rounds_at_once(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() whose wait ends while a block still runs, then start(): the old thread ends before a new one
    steps, so no two rounds ever run at once, and the requests still equal their runs alone."""
    import threading

    entered, gate, second = threading.Event(), threading.Event(), threading.Event()
    inside: list[int] = [0]
    most: list[int] = [0]
    lock = threading.Lock()
    real_step, real_denoise = Engine.step, Engine._denoise
    first_thread: list[threading.Thread] = []

    def step(self):
        with lock:
            if first_thread and threading.current_thread() is not first_thread[0]:
                second.set()
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return real_step(self)
        finally:
            with lock:
                inside[0] -= 1

    def denoise(self, *args, **kwargs):
        if not first_thread:
            first_thread.append(threading.current_thread())
            entered.set()
            gate.wait()
            second.wait(5)  # a second round would start now, while this one runs (never with the fix)
        return real_denoise(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(Engine, "_denoise", denoise)
    reqs = [EngineRequest(text_prompt(model.config, s, 6)[0], 16, 8, 4, 0.9, request_id=f"t{s}") for s in range(2)]
    eng = Engine(model, max_batch=2)
    eng.submit(reqs[0])
    eng.start()
    assert entered.wait(600)
    eng.stop(timeout=0)
    eng.submit(reqs[1])
    starter = threading.Thread(target=eng.start)
    starter.start()
    gate.set()
    starter.join()
    try:
        outs = [eng.result(r.request_id, timeout=600) for r in reqs]
    finally:
        eng.stop()
    assert most[0] == 1
    for r, o in zip(reqs, outs):
        solo = _solo(model, r)
        assert (o.token_ids, o.nfe) == (solo.completion_ids[0], solo.nfe)


def test_a_row_failing_after_the_commit_forward_fails_alone(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose next seed cannot be drawn (it raises after the block's shared commit forward) fails alone; its
    batch-mates re-run the block from its start and still equal their runs alone."""
    import nemotron_fast.engine as engine_mod

    reqs = [EngineRequest(text_prompt(model.config, s, 4 + 3 * s)[0], 20, 8, 3 * 2, 0.9, request_id=f"m{s}")
            for s in range(3)]
    poison = EngineRequest(text_prompt(model.config, 7, 6)[0], 20, 8, None, 0.9, temperature=0.8, seed=3,
                           request_id="poison")
    eng = Engine(model, max_batch=4)
    for r in [reqs[0], poison, *reqs[1:]]:
        eng.submit(r)
    poison_noise = next(r.noise for r in eng._waiting if r.rid == "poison")
    calls: list[int] = [0]
    real = engine_mod._seed_tokens

    def seed_tokens(logits, temperature, noise, exclude_id):
        if noise is poison_noise:
            calls[0] += 1
            if calls[0] > 1:  # the first call is the prefill's
                raise RuntimeError("poisoned seed")
        return real(logits, temperature, noise, exclude_id)

    monkeypatch.setattr(engine_mod, "_seed_tokens", seed_tokens)
    outs = {r: eng.result(r) for r in ["poison"] + [r.request_id for r in reqs]}
    assert outs["poison"].finish_reason == "error" and "poisoned seed" in str(outs["poison"].error)
    assert eng.max_rows_per_forward > 1
    for r in reqs:
        solo = _solo(model, r)
        assert (outs[r.request_id].token_ids, outs[r.request_id].nfe) == (solo.completion_ids[0], solo.nfe)
