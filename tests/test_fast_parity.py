"""The fast sampler gives exactly the reference's tokens, NFE and reveal trace (fp32), and >= 99% token
agreement in bf16. The reference runs on transformers' classes, the fast path on our model and kernels."""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass

import pytest

import nemotron_fast
from nemotron_fast import reference
from nemotron_fast.sampling import SamplingPolicy

from .helpers import text_prompt, vlm_prompt

HEAD_SCALE = 8.0  # peaky heads, so thresholds 0.5/0.9 reveal several tokens per step


@dataclass(frozen=True)
class Case:
    vlm: bool
    vocab: str
    block: int
    spb: int
    threshold: float | None
    max_tokens: int
    prompt_len: int
    seed: int

    def __str__(self) -> str:
        return (f"{'vlm' if self.vlm else 'text'}-{self.vocab}-L{self.block}-spb{self.spb}-thr{self.threshold}"
                f"-max{self.max_tokens}-p{self.prompt_len}")


def _cases() -> list[Case]:
    out = []
    blocks, thresholds = (1, 7, 32, 64), (0.0, 0.5, 0.9, 1.0, None)
    ckpts = [(False, "small"), (True, "small"), (False, "tekken"), (True, "tekken")]
    for i, (block, thr) in enumerate(itertools.product(blocks, thresholds)):
        for j in range(2):
            vlm, vocab = ckpts[(i + j) % 4]
            # steps per block from 1 to more than the block length
            spb = (1, 3, max(1, block - 1), block + 5)[(i + 2 * j) % 4]
            if vocab == "tekken" and block >= 32:
                spb = min(spb, 8)  # keep the 131k-vocabulary reference affordable
            max_tokens = 5 if block == 1 else block + block // 2 + 1  # not a multiple of the block
            out.append(Case(vlm, vocab, block, spb, thr, max_tokens, 11 + 2 * (i % 5), 100 * i + j))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def models(ckpt_factory):
    cache: dict = {}

    def get(vlm: bool, vocab: str, dtype: str = "float32"):
        key = (vlm, vocab, dtype)
        if key not in cache:
            path = ckpt_factory(vlm=vlm, vocab=vocab, seed=5, head_scale=HEAD_SCALE)
            cache[key] = nemotron_fast.load(path, dtype=dtype)
        return cache[key]

    return get


def _inputs(model, case: Case):
    if case.vlm:
        return vlm_prompt(model.config, case.seed, n_text=case.prompt_len)
    return text_prompt(model.config, case.seed, case.prompt_len), None, None


def _call(fn, model, case: Case, ids, pix, sizes, **kw):
    nb = -(-case.max_tokens // case.block)
    return fn(model, ids, pix, sizes, max_new_tokens=case.max_tokens, steps=nb * case.spb,
              block_length=case.block, threshold=case.threshold, **kw)


def test_case_matrix_covers_the_acceptance_points() -> None:
    assert len(CASES) >= 40
    assert {c.block for c in CASES} == {1, 7, 32, 64}
    assert {c.threshold for c in CASES} == {0.0, 0.5, 0.9, 1.0, None}
    assert min(c.spb for c in CASES) == 1 and any(c.spb > c.block for c in CASES)
    assert all(c.max_tokens % c.block for c in CASES if c.block > 1)
    assert {(c.vlm, c.vocab) for c in CASES} == {(False, "small"), (True, "small"), (False, "tekken"),
                                                  (True, "tekken")}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_exact_parity(models, case: Case) -> None:
    model = models(case.vlm, case.vocab)
    ids, pix, sizes = _inputs(model, case)
    ref = _call(reference.generate, model, case, ids, pix, sizes)
    fast = _call(nemotron_fast.generate, model, case, ids, pix, sizes)
    assert fast.completion_ids == ref.completion_ids
    assert fast.nfe == ref.nfe
    assert fast.trace == ref.trace


@pytest.mark.parametrize("vlm,vocab,block,threshold", [(False, "small", 7, 0.9), (True, "small", 32, None),
                                                       (False, "tekken", 32, 0.5), (True, "tekken", 7, 0.0)])
def test_eos_inside_a_block(models, vlm: bool, vocab: str, block: int, threshold) -> None:
    """Pick as EOS a token the model really produces mid-block, so the in-block EOS stop and the trim fire."""
    model = models(vlm, vocab)
    case = Case(vlm, vocab, block, block, threshold, 3 * block, 13, 7)
    ids, pix, sizes = _inputs(model, case)
    free = _call(reference.generate, model, case, ids, pix, sizes, eos_token_id=model.config.mask_token_id + 1)
    toks = free.completion_ids[0]
    eos = next(t for t in toks[block + 2:] if t != model.config.mask_token_id)
    ref = _call(reference.generate, model, case, ids, pix, sizes, eos_token_id=eos)
    fast = _call(nemotron_fast.generate, model, case, ids, pix, sizes, eos_token_id=eos)
    assert ref.completion_ids[0][-1] == eos and ref.nfe < free.nfe
    assert (fast.completion_ids, fast.nfe, fast.trace) == (ref.completion_ids, ref.nfe, ref.trace)


@pytest.mark.parametrize("vocab,threshold", [("small", 0.9), ("small", None), ("tekken", 0.5)])
def test_ragged_batch_per_row_eos_equals_each_row_alone(models, vocab: str, threshold) -> None:
    model = models(False, vocab)
    prompts = [text_prompt(model.config, s, n)[0] for s, n in ((1, 9), (2, 16), (3, 4))]
    kw = dict(max_new_tokens=40, steps=2 * 12, block_length=20, threshold=threshold)
    alone = [reference.generate(model, p.view(1, -1), **kw) for p in prompts]
    # an EOS that row 1 really produces in its second block (never the MASK), so rows stop at different blocks
    eos = next(t for t in alone[1].completion_ids[0][20:] if t != model.config.mask_token_id)
    alone = [reference.generate(model, p.view(1, -1), eos_token_id=eos, **kw) for p in prompts]
    batch = nemotron_fast.generate(model, prompts, eos_token_id=eos, policy=SamplingPolicy(per_row_eos=True), **kw)
    for r, one in enumerate(alone):
        assert batch.completion_ids[r] == one.completion_ids[0], f"row {r}"
        assert batch.row_nfe[r] == one.nfe, f"row {r}"
        assert [t[r] for t in batch.trace if t[r]] == [t[0] for t in one.trace], f"row {r}"
    assert len({len(c) for c in batch.completion_ids}) > 1


@pytest.mark.parametrize("policy", [SamplingPolicy(exclude_mask=True), SamplingPolicy(finish_last_step=True),
                                    SamplingPolicy(exclude_mask=True, finish_last_step=True)], ids=lambda p: p.name)
def test_opt_in_policies_match_the_reference_policies(models, policy: SamplingPolicy) -> None:
    model = models(True, "small")
    case = Case(True, "small", 32, 4, 0.9, 40, 9, 3)
    ids, pix, sizes = _inputs(model, case)
    ref = _call(reference.generate, model, case, ids, pix, sizes, policy=policy)
    fast = _call(nemotron_fast.generate, model, case, ids, pix, sizes, policy=policy)
    assert (fast.completion_ids, fast.nfe, fast.trace) == (ref.completion_ids, ref.nfe, ref.trace)
    mask = model.config.mask_token_id
    if policy.finish_last_step:
        assert mask not in fast.completion_ids[0]
    default = _call(nemotron_fast.generate, model, case, ids, pix, sizes)
    if not policy.exclude_mask:
        assert mask in default.completion_ids[0], "spb 4 < 31 masks must leave masks under the default policy"


def test_temperature_with_injected_noise_is_exact(models) -> None:
    model = models(True, "small")
    case = Case(True, "small", 7, 3, 0.5, 20, 9, 4)
    ids, pix, sizes = _inputs(model, case)
    ref = _call(reference.generate, model, case, ids, pix, sizes, temperature=0.7, seed=123)
    fast = _call(nemotron_fast.generate, model, case, ids, pix, sizes, temperature=0.7, seed=123)
    greedy = _call(nemotron_fast.generate, model, case, ids, pix, sizes)
    assert (fast.completion_ids, fast.nfe, fast.trace) == (ref.completion_ids, ref.nfe, ref.trace)
    assert fast.completion_ids != greedy.completion_ids


def test_bf16_token_agreement(models) -> None:
    """bf16 on both sides: report the agreement rate over the matrix; it must be >= 0.99."""
    same = total = 0
    for case in CASES[::3]:
        model = models(case.vlm, case.vocab, "bfloat16")
        ids, pix, sizes = _inputs(model, case)
        ref = _call(reference.generate, model, case, ids, pix, sizes).completion_ids[0]
        fast = _call(nemotron_fast.generate, model, case, ids, pix, sizes).completion_ids[0]
        n = max(len(ref), len(fast))
        same += sum(a == b for a, b in zip(ref, fast))
        total += n
    rate = same / total
    print(f"bf16 token agreement: {rate:.4f} over {total} tokens")
    assert rate >= 0.99


@pytest.mark.parametrize("case", CASES[::4] + [c for c in CASES if c.threshold is None][:3], ids=str)
def test_gpu_style_loop_on_cpu_is_exact(models, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA loop (the static decode state: batch bucket with filler rows, block positions on the device, the
    attention twin, all rows through the head, device-side trace) gives the reference's tokens, NFE and trace."""
    gen = importlib.import_module("nemotron_fast.generate")  # the module (the package attribute is the function)
    monkeypatch.setattr(gen, "_GPU_STYLE_ON_CPU", True)
    model = models(case.vlm, case.vocab)
    ids, pix, sizes = _inputs(model, case)
    ref = _call(reference.generate, model, case, ids, pix, sizes)
    fast = _call(nemotron_fast.generate, model, case, ids, pix, sizes)
    assert (fast.completion_ids, fast.nfe, fast.trace) == (ref.completion_ids, ref.nfe, ref.trace)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("case", CASES[1::7], ids=str)
def test_cuda_graphs_match_the_reference(ckpt_factory, case: Case) -> None:
    """On a GPU: the graphed loop with the Triton kernels equals the reference in fp32, runs no forward the NFE
    does not count, and a second call of the same shape captures no graph."""
    from nemotron_fast.decode.static import static_decode

    path = ckpt_factory(vlm=case.vlm, vocab=case.vocab, seed=5, head_scale=HEAD_SCALE)
    model = nemotron_fast.load(path, device="cuda", dtype="float32")
    ids, pix, sizes = _inputs(model, case)
    ids = ids.cuda()
    ref = _call(reference.generate, model, case, ids, pix, sizes)
    fast = _call(nemotron_fast.generate, model, case, ids, pix, sizes)
    before = static_decode(model).captures
    again = _call(nemotron_fast.generate, model, case, ids, pix, sizes)
    eager = _call(nemotron_fast.generate, model, case, ids, pix, sizes, use_cuda_graphs=False)
    assert (fast.completion_ids, fast.nfe, fast.trace) == (ref.completion_ids, ref.nfe, ref.trace)
    assert fast.forwards == fast.nfe + 1
    assert static_decode(model).captures == before, "the same shape must replay, not capture again"
    assert (again.completion_ids, again.nfe, again.trace) == (fast.completion_ids, fast.nfe, fast.trace)
    assert (eager.completion_ids, eager.nfe) == (ref.completion_ids, ref.nfe)


@pytest.mark.requires_gpu
def test_cuda_sampling_uses_in_kernel_philox_noise(ckpt_factory) -> None:
    """At T > 0 on CUDA the denoise steps draw Philox noise in the head kernel: a seed reproduces its tokens,
    another seed changes them, and greedy decoding is unaffected."""
    model = nemotron_fast.load(ckpt_factory(vlm=False, vocab="small", seed=5, head_scale=2.0), device="cuda")
    ids = text_prompt(model.config, 3, 9).cuda()
    kw = dict(max_new_tokens=32, block_length=8, steps=4 * 4, threshold=0.5, temperature=1.0)
    a = nemotron_fast.generate(model, ids, seed=1, **kw)
    assert nemotron_fast.generate(model, ids, seed=1, **kw).completion_ids == a.completion_ids
    assert nemotron_fast.generate(model, ids, seed=2, **kw).completion_ids != a.completion_ids
    assert a.forwards == a.nfe + 1


@pytest.mark.parametrize("gpu_style", [False, True])
def test_step_events_replay_the_trace_and_the_blocks(models, gpu_style: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``on_step`` reports every denoise step (its reveals equal the trace, its tokens the final tokens) and
    every commit (the finished block); the result is the same as without it."""
    gen = importlib.import_module("nemotron_fast.generate")
    monkeypatch.setattr(gen, "_GPU_STYLE_ON_CPU", gpu_style)
    model = models(False, "small")
    prompts = [text_prompt(model.config, s, n)[0] for s, n in ((1, 9), (2, 16))]
    kw = dict(max_new_tokens=30, steps=3 * 6, block_length=12, threshold=0.5)
    events = []
    plain = nemotron_fast.generate(model, prompts, **kw)
    seen = nemotron_fast.generate(model, prompts, on_step=events.append, **kw)
    assert (seen.completion_ids, seen.nfe, seen.trace) == (plain.completion_ids, plain.nfe, plain.trace)
    steps = [e for e in events if e.kind == "denoise"]
    commits = [e for e in events if e.kind == "commit"]
    assert [[[e.block * 12 + i for i in row] for row in e.revealed] for e in steps] == plain.trace
    assert [e.forwards for e in events] == list(range(1, plain.nfe + 1))
    for e in steps:
        for r, (pos, toks, conf) in enumerate(zip(e.revealed, e.tokens, e.confidence)):
            n = len(seen.completion_ids[r])
            assert [t for i, t in zip(pos, toks) if e.block * 12 + i < n] == [
                seen.completion_ids[r][e.block * 12 + i] for i in pos if e.block * 12 + i < n]
            assert len(conf) == len(pos) and all(0.0 <= c <= 1.0 for c in conf)
    assert [e.block for e in commits] == list(range(len(commits)))
    for e in commits:
        for r, toks in enumerate(e.tokens):
            got = seen.completion_ids[r][e.block * 12:(e.block + 1) * 12]
            assert len(toks) == 12 and toks[:len(got)] == got


def test_step_events_are_refused_outside_diffusion(models) -> None:
    model = models(False, "small")
    with pytest.raises(ValueError, match="on_step"):
        nemotron_fast.generate(model, text_prompt(model.config, 1, 5), max_new_tokens=4, mode="ar",
                               on_step=lambda e: None)


@pytest.mark.parametrize("gpu_style", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_forwards_are_the_nfe_plus_the_prefill(models, gpu_style: bool, ragged: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No forward runs that the NFE does not count: ``forwards == nfe + 1`` (the prefill), for batch 1 and for a
    ragged ``per_row_eos`` batch whose rows finish at different blocks, in the CPU loop and the CUDA-style one."""
    gen = importlib.import_module("nemotron_fast.generate")
    monkeypatch.setattr(gen, "_GPU_STYLE_ON_CPU", gpu_style)
    model = models(False, "small")
    kw = dict(max_new_tokens=60, steps=3 * 8, block_length=20, threshold=0.9)
    if not ragged:
        out = nemotron_fast.generate(model, text_prompt(model.config, 4, 9), **kw)
        assert out.forwards == out.nfe + 1 and out.nfe > 3
        return
    prompts = [text_prompt(model.config, s, n)[0] for s, n in ((1, 9), (2, 16), (3, 4))]
    free = reference.generate(model, prompts[1].view(1, -1), **kw)
    eos = next(t for t in free.completion_ids[0][20:] if t != model.config.mask_token_id)
    out = nemotron_fast.generate(model, prompts, eos_token_id=eos, policy=SamplingPolicy(per_row_eos=True), **kw)
    assert len(set(out.row_nfe)) > 1, "rows must finish at different points"
    assert out.forwards == out.nfe + 1 == max(out.row_nfe) + 1


@pytest.mark.parametrize("mode", ["ar", "linear_spec"])
def test_forwards_of_the_other_modes_equal_their_nfe(models, mode: str) -> None:
    model = models(False, "small")
    out = nemotron_fast.generate(model, text_prompt(model.config, 4, 9), max_new_tokens=24, block_length=8,
                                 threshold=0.5, mode=mode)
    assert out.forwards == out.nfe > 1


def test_graph_bookkeeping_captures_once_per_shape(ckpt_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-style loop on the CPU (the captured "graph" is the eager step): a shape's denoise step and commit
    are captured once per model; later calls of the same batch bucket, block length and cache size capture
    nothing, whatever their prompts; a new block length or a longer call captures that shape once."""
    from nemotron_fast.decode.static import static_decode

    gen = importlib.import_module("nemotron_fast.generate")
    monkeypatch.setattr(gen, "_GPU_STYLE_ON_CPU", True)
    model = nemotron_fast.load(ckpt_factory(vlm=False, vocab="small", seed=5, head_scale=HEAD_SCALE))
    sd = static_decode(model)
    kw = dict(max_new_tokens=24, block_length=8, threshold=0.9)

    def captures(prompts, **over) -> int:
        before = sd.captures
        out = nemotron_fast.generate(model, prompts, policy=SamplingPolicy(per_row_eos=True), **{**kw, **over})
        ref_kw = {k: v for k, v in {**kw, **over}.items() if k != "use_cuda_graphs"}
        alone = reference.generate(model, prompts[0].view(1, -1), **ref_kw)
        assert out.completion_ids[0] == alone.completion_ids[0]
        return sd.captures - before

    p = [text_prompt(model.config, s, n)[0] for s, n in ((1, 9), (2, 13), (3, 5))]
    assert captures(p[:1]) == 2  # denoise + commit of (bucket 1, L 8)
    assert captures(p[1:2]) == 0  # another prompt, same shape
    assert captures(p[:3]) == 2  # bucket 4
    assert captures(p[1:3] + p[:1]) == 0  # 3 rows again: bucket 4, other prompts
    assert captures(p[:1], block_length=4) == 2  # a new block length
    assert captures(p[:1], block_length=4) == 0
    assert captures(p[:1], max_new_tokens=400) == 2  # a longer call grows the cache: its graphs are new
    assert captures(p[:1], temperature=0.5, seed=3) == 0  # sampling runs the steps eagerly
    assert captures(p[:1], use_cuda_graphs=False) == 0
