"""The other two decoding modes (upstream ``ar_generate`` and ``linear_spec_generate``): the fast paths give the
reference's tokens, NFE and acceptance trace exactly in fp32; batched linear_spec rows equal their runs alone;
greedy self-speculation emits only what the verify picked, which is greedy AR; the draft adapter changes drafts
and nothing else.

The random tiny checkpoints rarely agree with their own drafts (acceptance ~1), so the long accepted runs (and an
EOS inside one) come from the shipped demo model, which was trained in both attention modes."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nemotron_fast
from nemotron_fast import reference
from nemotron_fast.sampling import SamplingPolicy

from .helpers import text_ids, text_prompt, vlm_prompt

HEAD_SCALE = 8.0


@dataclass(frozen=True)
class Case:
    kind: str  # "text" | "vlm" | "lora" | "tekken" | "demo"
    block: int
    threshold: float
    max_tokens: int
    prompt_len: int
    seed: int
    eos_pick: int | None = None  # use the token at this offset of a free run as the EOS id

    def __str__(self) -> str:
        return (f"{self.kind}-L{self.block}-thr{self.threshold}-max{self.max_tokens}-p{self.prompt_len}"
                f"-s{self.seed}" + (f"-eos{self.eos_pick}" if self.eos_pick is not None else ""))


def _cases(n: int, salt: int) -> list[Case]:
    rng = random.Random(salt)
    kinds = ["text", "vlm", "lora", "demo"] * 11
    out = []
    for i in range(n):
        kind = "tekken" if i in (5, 29) else kinds[i]
        block = rng.choice([4, 5, 7, 8, 13, 16, 32]) if i else 32
        if kind == "tekken":
            block = min(block, 8)  # the 131k-vocabulary reference softmax per draft forward is slow
        thr = (0.0, 0.5, 0.9)[i % 3]
        # random tiny models accept ~1 token per verify: keep their drafts affordable at a large block
        max_tokens = rng.randint(20, 70) if kind == "demo" else rng.randint(5, 12 if thr and block > 8 else 24)
        if max_tokens % block == 0:
            max_tokens += 1
        out.append(Case(kind, block, thr, max_tokens, rng.randint(1, 31), 1000 * salt + i,
                        eos_pick=rng.choice([None, 1, 3]) if kind != "demo" else None))
    return out


AR_CASES = _cases(40, 1)
SPEC_CASES = _cases(44, 2)


@pytest.fixture(scope="module")
def models(ckpt_factory):
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            if kind == "demo":
                from nemotron_fast.pipeline import default_model_path

                path = default_model_path()
            else:
                path = ckpt_factory(vlm=kind == "vlm", vocab="tekken" if kind == "tekken" else "small", seed=5,
                                    head_scale=HEAD_SCALE, draft_lora_rank=4 if kind == "lora" else 0)
            cache[kind] = nemotron_fast.load(path, dtype="float32")
        return cache[kind]

    return get


def _demo_inputs(model, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A request the demo model was trained to answer: a drawn scene and a question about it (or its
    description), built by the checkpoint's own processor -> (ids [1, T], pixel_values, image_sizes)."""
    from nemotron_fast.demo.scenes import make_scene, scene_seed

    scene = make_scene(scene_seed("example", 1, seed))
    questions = ["Describe the image.", *(qa.question for qa in scene.qa)]
    inp = model.processor.build_inputs(questions[seed % len(questions)], [scene.image])
    return inp.input_ids, inp.pixel_values, inp.image_sizes


def _inputs(model, case: Case):
    if case.kind == "vlm":
        return vlm_prompt(model.config, case.seed, n_text=case.prompt_len)
    if case.kind == "demo":  # a real request: its prompt length is the processor's, not prompt_len
        return _demo_inputs(model, case.seed)
    return text_prompt(model.config, case.seed, case.prompt_len), None, None


def _run(fn, model, case: Case, mode: str, ids, pix, sizes, **kw):
    return fn(model, ids, pix, sizes, max_new_tokens=case.max_tokens, block_length=case.block,
              threshold=case.threshold, mode=mode, **kw)


def _eos_for(model, case: Case, mode: str, ids, pix, sizes) -> int | list[int]:
    if case.eos_pick is None:
        return list(model.config.eos_token_ids)
    free = _run(nemotron_fast.generate, model, case, mode, ids, pix, sizes, eos_token_id=[])
    toks = [t for t in free.completion_ids[0] if t != model.config.mask_token_id]
    return toks[min(case.eos_pick, len(toks) - 1)] if toks else list(model.config.eos_token_ids)


def test_case_matrices_cover_the_acceptance_points() -> None:
    for cases in (AR_CASES, SPEC_CASES):
        assert len(cases) >= 40
        assert {c.threshold for c in cases} == {0.0, 0.5, 0.9}
        assert min(c.block for c in cases) == 4 and max(c.block for c in cases) == 32
        assert all(c.max_tokens % c.block for c in cases)
        assert min(c.prompt_len for c in cases) <= 3 and max(c.prompt_len for c in cases) >= 28
        assert {"text", "vlm", "lora", "tekken", "demo"} <= {c.kind for c in cases}


def _parity(models, case: Case, mode: str):
    """Run ``case`` in ``mode`` through the reference and the fast path; assert the discrete outputs agree."""
    model = models(case.kind)
    ids, pix, sizes = _inputs(model, case)
    eos = _eos_for(model, case, mode, ids, pix, sizes)
    ref = _run(reference.generate, model, case, mode, ids, pix, sizes, eos_token_id=eos)
    fast = _run(nemotron_fast.generate, model, case, mode, ids, pix, sizes, eos_token_id=eos)
    assert (fast.completion_ids, fast.nfe, fast.row_nfe) == (ref.completion_ids, ref.nfe, ref.row_nfe)
    return ref, fast, eos


@pytest.mark.parametrize("case", AR_CASES, ids=str)
def test_ar_fp32_exact_parity(models, case: Case) -> None:
    ref, _, _ = _parity(models, case, "ar")
    # upstream's NFE convention: one per generated token
    assert ref.nfe == len(ref.completion_ids[0]) <= case.max_tokens


@pytest.mark.parametrize("case", SPEC_CASES, ids=str)
def test_linear_spec_fp32_exact_parity(models, case: Case) -> None:
    ref, fast, eos = _parity(models, case, "linear_spec")
    assert fast.spec_trace == ref.spec_trace
    _check_spec_invariants(fast, case, eos)


def _check_spec_invariants(result, case: Case, eos) -> None:
    """Every emitted token is the verify's pick; acceptance is 1 + the matching prefix; NFE adds up."""
    eos_set = set(eos) if isinstance(eos, list) else {eos}
    out = result.completion_ids[0]
    emitted = [out[0]]
    nfe = 1
    for (step,) in result.spec_trace:
        assert step.draft[0] == emitted[-1], "the draft block starts with the last emitted (bonus) token"
        n = 1
        while n < case.block and step.verify[n - 1] == step.draft[n]:
            n += 1
        assert step.accepted == n
        # L - 1 masks (L when the seed is the MASK id): at most that many threshold forwards
        assert 1 <= step.draft_nfe <= (1 if case.threshold == 0 else case.block)
        emitted += list(step.verify[:n])
        nfe += step.draft_nfe + 1
    assert result.nfe == nfe
    cut = next((i for i, t in enumerate(emitted) if t in eos_set), None)
    assert out == (emitted if cut is None else emitted[:cut + 1])
    if cut is None:
        assert len(out) >= case.max_tokens


def test_matrix_has_long_runs_and_an_eos_inside_one(models) -> None:
    """The demo model accepts long runs and ends with an EOS inside one; the whole run overshoots the cap."""
    model = models("demo")
    case = Case("demo", 32, 0.0, 9, 20, 0)  # seed 0: "Describe the image." (a 20-odd-token answer)
    ids, pix, sizes = _inputs(model, case)
    ref = _run(reference.generate, model, case, "linear_spec", ids, pix, sizes)
    fast = _run(nemotron_fast.generate, model, case, "linear_spec", ids, pix, sizes)
    assert (fast.completion_ids, fast.nfe, fast.spec_trace) == (ref.completion_ids, ref.nfe, ref.spec_trace)
    (step,) = ref.spec_trace[0]
    assert step.accepted > case.max_tokens, "one verify accepts past max_new_tokens"
    out = ref.completion_ids[0]
    if out[-1] in model.config.eos_token_ids:
        assert len(out) < 1 + step.accepted, "the EOS cut fell inside the accepted run"
    else:
        assert len(out) == 1 + step.accepted > case.max_tokens, "upstream overshoots"
    cut = _run(nemotron_fast.generate, model, case, "linear_spec", ids, pix, sizes,
               policy=SamplingPolicy(truncate_overshoot=True))
    assert cut.completion_ids[0] == out[:case.max_tokens] and cut.nfe == ref.nfe
    assert ref.nfe == 2 + step.draft_nfe


def test_eos_inside_an_accepted_run(models) -> None:
    model = models("demo")
    hits = 0
    for seed in range(6):
        ids, pix, sizes = _demo_inputs(model, seed)
        kw = dict(max_new_tokens=60, block_length=32, threshold=0.0, mode="linear_spec")
        ref = reference.generate(model, ids, pix, sizes, **kw)
        fast = nemotron_fast.generate(model, ids, pix, sizes, **kw)
        assert (fast.completion_ids, fast.nfe, fast.spec_trace) == (ref.completion_ids, ref.nfe, ref.spec_trace)
        out, last = ref.completion_ids[0], ref.spec_trace[-1][0] if ref.spec_trace else None
        if last is not None and out[-1] in model.config.eos_token_ids:
            emitted_before = len(out) - (list(last.verify).index(out[-1]) + 1)
            hits += last.verify.index(out[-1]) + 1 < last.accepted and emitted_before >= 1
    assert hits >= 1


@pytest.mark.parametrize("kind,threshold", [("text", 0.0), ("lora", 0.9), ("demo", 0.5), ("vlm", 0.0)])
def test_batched_linear_spec_rows_equal_their_runs_alone(models, kind: str, threshold: float) -> None:
    model = models(kind)
    cfg = model.config
    if kind == "vlm":
        parts = [vlm_prompt(cfg, s, n_text=n) for s, n in ((1, 3), (2, 9))]
        prompts = [p[0][0] for p in parts]
        pix = torch.cat([torch.nn.functional.pad(p[1], (0, 28 * 3 - p[1].shape[-1], 0, 28 * 2 - p[1].shape[-2]))
                         for p in parts])
        sizes = torch.cat([p[2] for p in parts])
        alone = [nemotron_fast.generate(model, p[0], p[1], p[2], max_new_tokens=17, block_length=6,
                                        threshold=threshold, mode="linear_spec") for p in parts]
        batch = nemotron_fast.generate(model, prompts, pix, sizes, max_new_tokens=17, block_length=6,
                                       threshold=threshold, mode="linear_spec")
    elif kind == "demo":
        parts = [_demo_inputs(model, s) for s in (1, 2, 3)]  # equal-sized scenes: the pixels simply stack
        kw = dict(max_new_tokens=40, block_length=8, threshold=threshold, mode="linear_spec")
        alone = [nemotron_fast.generate(model, *p, **kw) for p in parts]
        batch = nemotron_fast.generate(model, [p[0][0] for p in parts], torch.cat([p[1] for p in parts]),
                                       torch.cat([p[2] for p in parts]), **kw)
        ref = reference.generate(model, *parts[1], **kw)
        assert ref.completion_ids == alone[1].completion_ids and ref.spec_trace == alone[1].spec_trace
    else:
        prompts = [text_prompt(cfg, s, n)[0] for s, n in ((1, 9), (2, 17), (3, 4))]
        kw = dict(max_new_tokens=15, block_length=8, threshold=threshold, mode="linear_spec")
        alone = [nemotron_fast.generate(model, p.view(1, -1), **kw) for p in prompts]
        batch = nemotron_fast.generate(model, prompts, **kw)
        ref = reference.generate(model, prompts[1].view(1, -1), **kw)
        assert ref.completion_ids == alone[1].completion_ids and ref.spec_trace == alone[1].spec_trace
    for r, one in enumerate(alone):
        assert batch.completion_ids[r] == one.completion_ids[0], f"row {r}"
        assert batch.row_nfe[r] == one.nfe, f"row {r}"
        # the verify's picks past the accepted run are never used (and a batched forward may round them
        # differently); everything that decides tokens must be equal
        assert [_used(it[r]) for it in batch.spec_trace if it[r] is not None] == \
            [_used(it[0]) for it in one.spec_trace], f"row {r}"
    assert batch.nfe >= max(batch.row_nfe)


def _used(step):
    return step.draft, step.verify[:step.accepted], step.accepted, step.draft_nfe


def test_batched_ar_rows_per_row_eos_and_batch_coupled(models) -> None:
    model = models("text")
    cfg = model.config
    prompts = [text_prompt(cfg, s, n)[0] for s, n in ((4, 5), (5, 12), (6, 8))]
    free = [nemotron_fast.generate(model, p.view(1, -1), max_new_tokens=20, mode="ar", eos_token_id=[])
            for p in prompts]
    eos = free[1].completion_ids[0][6]
    alone = [nemotron_fast.generate(model, p.view(1, -1), max_new_tokens=20, mode="ar", eos_token_id=eos)
             for p in prompts]
    batch = nemotron_fast.generate(model, prompts, max_new_tokens=20, mode="ar", eos_token_id=eos,
                                   policy=SamplingPolicy(per_row_eos=True))
    for r, one in enumerate(alone):
        assert batch.completion_ids[r] == one.completion_ids[0] and batch.row_nfe[r] == one.nfe
    # batch-coupled (upstream): rows run until all of them just produced the EOS at the same step
    same_len = torch.stack([text_prompt(cfg, s, 9)[0] for s in (7, 8)])
    ref = reference.generate(model, same_len, max_new_tokens=20, mode="ar", eos_token_id=eos)
    fast = nemotron_fast.generate(model, same_len, max_new_tokens=20, mode="ar", eos_token_id=eos)
    assert (fast.completion_ids, fast.nfe) == (ref.completion_ids, ref.nfe)
    assert len({len(r) for r in fast.completion_ids}) == 1


def test_greedy_linear_spec_emits_greedy_ar(models) -> None:
    """In fp32 every emitted token is the argmax of a cache-free causal forward over what precedes it (what
    greedy AR picks), with and without the draft adapter; the agreement with the AR mode is exact here."""
    model = models("lora")
    agree = total = 0
    for seed in range(5):
        ids = text_prompt(model.config, seed, 5 + 3 * seed)
        ar = nemotron_fast.generate(model, ids, max_new_tokens=16, mode="ar", eos_token_id=[])
        for lora in (True, False):
            spec = nemotron_fast.generate(model, ids, max_new_tokens=16, block_length=6, threshold=0.0,
                                          mode="linear_spec", eos_token_id=[], draft_lora=lora)
            out = spec.completion_ids[0]
            full = torch.cat([ids[0], torch.tensor(out[:-1])]).view(1, -1)
            greedy = model(full)[0, ids.shape[1] - 1:].argmax(-1).tolist()
            assert out == greedy
            n = min(len(out), len(ar.completion_ids[0]))
            agree += sum(a == b for a, b in zip(out[:n], ar.completion_ids[0][:n]))
            total += n
    print(f"linear_spec vs ar token agreement (fp32): {agree / total:.4f} over {total} tokens")
    assert agree == total


def test_draft_adapter_changes_drafts_not_emitted_tokens(models) -> None:
    model = models("lora")
    assert model.draft_lora is not None and model.draft_lora.projections == {"o_proj"}
    assert model.draft_lora.scale == 4.0  # lora_alpha / r, upstream's 512 / 128
    changed = 0
    for seed in range(4):
        ids = text_prompt(model.config, seed, 7)
        kw = dict(max_new_tokens=14, block_length=8, threshold=0.5, mode="linear_spec", eos_token_id=[])
        on = nemotron_fast.generate(model, ids, **kw)
        off = nemotron_fast.generate(model, ids, draft_lora=False, **kw)
        ref_on = reference.generate(model, ids, **kw)
        ref_off = reference.generate(model, ids, draft_lora=False, **kw)
        assert (on.completion_ids, on.spec_trace) == (ref_on.completion_ids, ref_on.spec_trace)
        assert (off.completion_ids, off.spec_trace) == (ref_off.completion_ids, ref_off.spec_trace)
        first_on, first_off = on.spec_trace[0][0], off.spec_trace[0][0]
        changed += first_on.draft != first_off.draft
        # the verify of the same block is the same: the adapter never reaches an emitted token
        assert on.completion_ids == off.completion_ids
    assert changed >= 1


def test_linear_spec_reference_refuses_batches_and_fast_takes_vlm_ragged(models) -> None:
    model = models("text")
    ids = torch.stack([text_prompt(model.config, s, 6)[0] for s in (1, 2)])
    with pytest.raises(ValueError, match="one row"):
        reference.generate(model, ids, max_new_tokens=5, mode="linear_spec")
    with pytest.raises(ValueError, match="mode"):
        nemotron_fast.generate(model, ids, max_new_tokens=5, mode="speculative")


def test_draft_that_only_picks_mask_stops_after_its_masks(ckpt_factory, tmp_path: Path) -> None:
    """A head that always prefers the MASK id: upstream's threshold draft would never end; ours stops after as
    many forwards as the block had masks, and the verify accepts the MASKs it also picks."""
    from safetensors.torch import load_file, save_file

    src = Path(ckpt_factory(vlm=False, seed=9))
    for f in src.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    w = load_file(str(tmp_path / "model.safetensors"))
    cfg = nemotron_fast.load(src).config
    w["diffusion_head.weight"][cfg.mask_token_id] = w["encoder.norm.weight"] * 50.0
    save_file(w, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = nemotron_fast.load(tmp_path)
    ids = text_prompt(cfg, 1, 6)
    kw = dict(max_new_tokens=10, block_length=4, threshold=0.9, mode="linear_spec", eos_token_id=[])
    ref = reference.generate(model, ids, **kw)
    fast = nemotron_fast.generate(model, ids, **kw)
    assert (fast.completion_ids, fast.nfe, fast.spec_trace) == (ref.completion_ids, ref.nfe, ref.spec_trace)
    assert ref.completion_ids[0] == [cfg.mask_token_id] * len(ref.completion_ids[0])
    assert all(s.draft_nfe == 4 for (s,) in ref.spec_trace)  # the seed is MASK too: L masks, L forwards
    assert all(s.accepted == 4 for (s,) in ref.spec_trace)
    assert ref.nfe == 1 + len(ref.spec_trace) * 5


def test_temperature_with_seeded_noise_is_exact(models) -> None:
    model = models("vlm")
    ids, pix, sizes = vlm_prompt(model.config, 3, n_text=5)
    for mode in ("ar", "linear_spec"):
        kw = dict(max_new_tokens=9, block_length=5, threshold=0.5, mode=mode, temperature=0.8, seed=11)
        ref = reference.generate(model, ids, pix, sizes, **kw)
        fast = nemotron_fast.generate(model, ids, pix, sizes, **kw)
        assert (fast.completion_ids, fast.nfe, fast.spec_trace) == (ref.completion_ids, ref.nfe, ref.spec_trace)


def test_twin_uses_the_current_cache_argument(models) -> None:
    """No deprecation warning from transformers: the twin passes the cache under the name it takes now."""
    model = models("text")
    twin = reference.get_twin(model)
    ids = text_ids(model.config, 5, torch.Generator().manual_seed(0)).view(1, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = twin.new_cache()
        twin.causal_forward(twin.embed(ids), cache)
        twin.diffusion_forward(twin.embed(ids[:, :3]), cache)
    assert cache.get_seq_length() == 5


def test_mode_input_beyond_the_endpoint_schema(ckpt_factory, tmp_path: Path) -> None:
    """``mode`` is validated, defaults to diffusion, splits batches, and the Pipeline, the CLI and the OpenAI body
    mapping carry it; usage reports each mode's NFE and the completion is cut to max_tokens."""
    import json
    import subprocess
    import sys

    from PIL import Image

    from nemotron_fast import Pipeline
    from nemotron_fast.errors import InputValidationError
    from nemotron_fast.params import validate_inputs

    base = {"image_url": "x.png", "prompt": "hi", "max_tokens": 7, "block_length": 4}
    assert validate_inputs(base).mode == "diffusion"
    p = validate_inputs({**base, "mode": "linear_spec"})
    assert p.mode == "linear_spec" and p.batch_key() != validate_inputs(base).batch_key()
    with pytest.raises(InputValidationError) as exc:
        validate_inputs({**base, "mode": "beam"})
    assert exc.value.errors[0]["loc"] == ["body", "mode"]

    path = ckpt_factory(vlm=True, seed=31, head_scale=8.0)
    img = tmp_path / "im.png"
    Image.new("RGB", (60, 44), "red").save(img)
    pipe = Pipeline.from_pretrained(path)
    inputs = {**base, "image_url": str(img), "threshold": 0.5}
    outs = {m: pipe.run({**inputs, "mode": m}, allow_local_files=True) for m in ("diffusion", "ar", "linear_spec")}
    assert pipe.run(inputs, allow_local_files=True)["usage"] == outs["diffusion"]["usage"]
    proc = pipe.processor.build_inputs("hi", [Image.open(img).convert("RGB")])
    for m in ("ar", "linear_spec"):
        direct = nemotron_fast.generate(pipe.model, proc.input_ids, proc.pixel_values, proc.image_sizes,
                                        max_new_tokens=7, block_length=4, threshold=0.5, mode=m,
                                        policy=SamplingPolicy(truncate_overshoot=True))
        assert outs[m]["usage"]["num_function_evals"] == direct.nfe
        assert outs[m]["usage"]["completion_tokens"] == len(direct.completion_ids[0]) <= 7
    batch = pipe.run_batch([{**inputs, "mode": "linear_spec"}, {**inputs, "mode": "ar"},
                            {**inputs, "mode": "linear_spec", "prompt": "other"}], allow_local_files=True)
    assert batch[0]["output"] == outs["linear_spec"]["output"] and batch[1]["output"] == outs["ar"]["output"]
    assert batch[0]["usage"] == outs["linear_spec"]["usage"]

    cli = subprocess.run([sys.executable, "-m", "nemotron_fast.cli", "generate", "--image", str(img), "--prompt",
                          "hi", "--model", str(path), "--max-tokens", "7", "--block-length", "4", "--threshold",
                          "0.5", "--mode", "ar", "--json"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.strip().splitlines()[-1])["output"] == outs["ar"]["output"]

    pytest.importorskip("fastapi")
    from nemotron_fast.server.openai_compat import chat_to_inputs
    from nemotron_fast.server.schemas import ChatCompletionRequest, NemotronInput

    body = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        mode="linear_spec")
    assert chat_to_inputs(body)["mode"] == "linear_spec"
    fal = NemotronInput(image_url="https://x/y.png", prompt="hi", mode="ar")
    assert fal.to_pipeline()["mode"] == "ar" and "mode" not in NemotronInput(image_url="https://x/y.png",
                                                                           prompt="hi").to_pipeline()
    assert "mode" not in NemotronInput.model_json_schema()["properties"]


def test_accept_rule_and_draft_reveal_on_plain_tensors() -> None:
    from nemotron_fast.decode.linear_spec import reveal_threshold
    from nemotron_fast.reference_modes import accept_length

    # accepted = 1 + longest prefix with verify[i] == draft[i + 1]; the bonus is verify[accepted - 1]
    assert accept_length([7, 1, 2, 3], [1, 2, 9, 4]) == 3
    assert accept_length([7, 1, 2, 3], [5, 2, 3, 4]) == 1
    assert accept_length([7, 1, 2, 3], [1, 2, 3, 4]) == 4
    assert accept_length([7], [3]) == 1
    # threshold reveal: every masked conf >= thr (in conf's dtype), else the single most confident (lowest on ties)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for _ in range(50):
            conf = torch.rand(3, 9, generator=g).to(dtype)
            conf[0, 2] = conf[0, 5] = 0.95  # a tie above every other value of row 0
            masked = torch.rand(3, 9, generator=g) < 0.6
            masked[2] = False
            got = reveal_threshold(conf, masked, 0.9)
            ref = reference.select_threshold(torch.where(masked, conf, float("-inf")), masked, 0.9)
            assert torch.equal(got, ref)
    low = torch.tensor([[0.2, 0.3, 0.3, 0.1]])
    assert reveal_threshold(low, torch.tensor([[True, True, True, False]]), 0.5).tolist() == \
        [[False, True, False, False]]
    # bf16: 0.9 compares as bf16(0.9) = 0.8984375
    assert reveal_threshold(torch.tensor([[0.8984375, 0.8984375, 0.1]], dtype=torch.bfloat16),
                            torch.tensor([[True, True, True]]), 0.9).tolist() == [[True, True, False]]
    assert reveal_threshold(torch.tensor([[0.8984375, 0.8984375, 0.1]], dtype=torch.float32),
                            torch.tensor([[True, True, True]]), 0.9).tolist() == [[True, False, False]]
