"""confidence_argmax: Triton kernel vs its torch twin on irregular shapes, ties, strides, noise, exclusion."""

from __future__ import annotations

import math

import pytest
import torch

from nemotron_fast.kernels import confidence as mod
from nemotron_fast.kernels._common import is_interpreted
from nemotron_fast.kernels._philox import philox_uniform64_ref
from nemotron_fast.kernels.confidence import confidence_argmax, confidence_argmax_ref, confidence_argmax_triton

from .tolerance import assert_at_most_2x_torch_error, assert_conf_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, V, block_v): V = 1, V < tile, V a multiple of the tile, V not a multiple, several tiles.
SHAPES = [(1, 1, 16), (1, 7, 16), (3, 64, 16), (5, 300, 64), (4, 1000, 128)]


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, vocab, generator=g)).to(dtype)


def _noise(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _assert_matches(out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    x0, conf = (t.cpu() for t in out)
    assert x0.dtype == torch.int64
    assert torch.equal(x0, ref[0]), f"x0 {x0.tolist()} != ref {ref[0].tolist()}"
    assert_conf_close(conf, ref[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab,block_v", SHAPES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_greedy_matches_ref(device, poison, dtype, rows, vocab, block_v, num_splits):
    logits = _logits(rows, vocab, dtype)
    with poison():
        out = confidence_argmax_triton(logits.to(device), num_splits=num_splits, block_v=block_v)
    _assert_matches(out, confidence_argmax_ref(logits))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("rows,vocab,block_v", [(1, 1, 16), (3, 7, 16), (5, 300, 64)])
def test_gumbel_with_injected_noise_matches_ref(device, poison, dtype, temperature, rows, vocab, block_v):
    logits, u = _logits(rows, vocab, dtype, seed=2), _noise((rows, vocab))
    with poison():
        out = confidence_argmax_triton(logits.to(device), temperature, u.to(device), num_splits=2, block_v=block_v)
    _assert_matches(out, confidence_argmax_ref(logits, temperature, u))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape,block_v", [((1, 1), 16), ((3, 7), 16), ((2, 3, 300), 64)])
def test_seeded_noise_matches_ref_on_the_rebuilt_draw(device, poison, dtype, temperature, shape, block_v):
    seed, offset = 1234, 2**33 + 17
    logits = _logits(int(torch.tensor(shape[:-1]).prod()), shape[-1], dtype, seed=3).view(shape)
    with poison():
        out = confidence_argmax_triton(logits.to(device), temperature, seed=seed, offset=offset, num_splits=2,
                                       block_v=block_v)
    expected = confidence_argmax_ref(logits, temperature, philox_uniform64_ref(seed, offset, shape))
    _assert_matches(out, expected)
    _assert_matches(confidence_argmax_ref(logits, temperature, seed=seed, offset=offset), expected)


def test_seeded_noise_on_a_strided_view_uses_logical_indices(device):
    base = _logits(4, 200, torch.float32, seed=4)
    view = base.to(device)[::2, ::2]
    out = confidence_argmax_triton(view, 0.9, seed=7, offset=5, num_splits=2, block_v=32)
    _assert_matches(out, confidence_argmax_ref(base[::2, ::2], 0.9, philox_uniform64_ref(7, 5, (2, 100))))


def test_ref_gumbel_is_upstreams_formula():
    logits, u = _logits(4, 50, torch.bfloat16), _noise((4, 50))
    expected = (logits.double().exp() / (-torch.log(u)) ** 0.7).argmax(-1)
    assert torch.equal(confidence_argmax_ref(logits, 0.7, u)[0], expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_logits_pick_index_0(device, poison, dtype):
    logits = torch.full((3, 100), 2.5, dtype=dtype)
    with poison():
        x0, conf = confidence_argmax_triton(logits.to(device), num_splits=4, block_v=16)
    assert x0.cpu().tolist() == [0, 0, 0]
    assert_conf_close(conf.cpu(), torch.full((3,), 0.01).to(dtype))


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_tie_across_tiles_and_splits_goes_to_lowest_index(device, num_splits):
    logits = torch.zeros(2, 160)
    logits[0, [37, 99, 150]] = 4.0
    logits[1, [130, 20]] = 4.0
    x0, _ = confidence_argmax_triton(logits.to(device), num_splits=num_splits, block_v=16)
    assert x0.cpu().tolist() == [37, 20]
    assert confidence_argmax_ref(logits)[0].tolist() == [37, 20]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_exclude_id(device, temperature):
    logits = _logits(3, 90, torch.float32, seed=5)
    top = logits.argmax(-1)
    logits[:, 40] = logits.max() + 5
    u = _noise((3, 90))
    for exclude in (40, 0, 89):
        ref = confidence_argmax_ref(logits, temperature, u, exclude_id=exclude)
        assert not (ref[0] == exclude).any()
        out = confidence_argmax_triton(logits.to(device), temperature, u.to(device), exclude, num_splits=3,
                                       block_v=16)
        _assert_matches(out, ref)
    if temperature == 0:
        assert torch.equal(confidence_argmax_ref(logits, exclude_id=40)[0], top)


@pytest.mark.parametrize("exclude", [0, 5])
def test_exclude_id_on_constant_logits_takes_the_next_lowest(device, exclude):
    logits = torch.zeros(2, 33)
    expected = 1 if exclude == 0 else 0
    assert confidence_argmax_ref(logits, exclude_id=exclude)[0].tolist() == [expected] * 2
    x0, _ = confidence_argmax_triton(logits.to(device), exclude_id=exclude, num_splits=2, block_v=16)
    assert x0.cpu().tolist() == [expected] * 2


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_all_neg_inf_row_with_exclusion(device):
    logits = torch.full((1, 20), float("-inf"))
    assert confidence_argmax_ref(logits, exclude_id=0)[0].tolist() == [1]
    x0, _ = confidence_argmax_triton(logits.to(device), exclude_id=0, num_splits=2, block_v=16)
    assert x0.cpu().tolist() == [1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_batched_inputs(device, poison, dtype):
    base = _logits(6, 2 * 150, dtype, seed=7).to(device)
    strided = base[::2, ::2]  # row and column strides 2
    transposed = _logits(130, 4, dtype, seed=8).to(device).t()  # column stride 4
    batched = base.view(2, 3, 300)  # leading dims [2, 3]
    u = _noise((2, 3, 300)).to(device)
    for logits, temperature, noise in ((strided, 0.0, None), (transposed, 0.0, None), (batched, 0.7, u)):
        with poison():
            out = confidence_argmax_triton(logits, temperature, noise, num_splits=2, block_v=64)
        ref = confidence_argmax_ref(logits.cpu(), temperature, None if noise is None else noise.cpu())
        assert out[0].shape == logits.shape[:-1]
        _assert_matches(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conf_error_at_most_twice_torchs(device, dtype):
    logits = _logits(16, 500, dtype, seed=9)
    _, conf = confidence_argmax_triton(logits.to(device), num_splits=3, block_v=64)
    x0 = logits.argmax(-1, keepdim=True)
    truth = torch.softmax(logits.double(), -1).gather(-1, x0).squeeze(-1)
    plain = torch.softmax(logits, -1).gather(-1, x0).squeeze(-1)
    assert_at_most_2x_torch_error(conf.cpu(), plain, truth)


def test_empty_rows(device):
    x0, conf = confidence_argmax_triton(torch.empty(0, 10, device=device))
    assert x0.shape == (0,) and conf.shape == (0,)


def test_gumbel_samples_softmax_over_t(device):
    # 4000 draws over 6 tokens; chi-square against softmax(l / T) with 5 dof (p = 1e-4 cut: 25.7). The
    # interpreter runs one program at a time, so on CPU the reference draws (the kernel matches it exactly on
    # injected noise, see above) and the kernel draws itself only on a GPU.
    temperature, draws = 0.8, 4000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 1.0])
    u = _noise((draws, 6), seed=11)
    fn = confidence_argmax_triton if device == "cuda" else confidence_argmax_ref
    x0, _ = fn(logits.expand(draws, 6).to(device), temperature, u.to(device))
    counts = torch.bincount(x0.cpu(), minlength=6).double()
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.7, f"chi-square {chi2:.1f}: counts {counts.tolist()} vs expected {expected.tolist()}"


def test_seeded_gumbel_samples_softmax_over_t(device):
    # The same chi-square bar for in-kernel Philox noise (reference on CPU: it rebuilds the kernel's draw).
    temperature, draws = 1.3, 4000
    logits = torch.tensor([0.2, -1.0, 1.5, 0.0, 0.7, 1.0])
    fn = confidence_argmax_triton if device == "cuda" else confidence_argmax_ref
    x0, _ = fn(logits.expand(draws, 6).to(device), temperature, seed=99, offset=0)
    counts = torch.bincount(x0.cpu(), minlength=6).double()
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.7, f"chi-square {chi2:.1f}: counts {counts.tolist()} vs expected {expected.tolist()}"


def test_dispatcher_routes_by_device_and_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "confidence_argmax_ref", lambda *a, **kw: calls.append("ref") or "ref")
    monkeypatch.setattr(mod, "confidence_argmax_triton", lambda *a, **kw: calls.append("triton") or "triton")
    logits = torch.zeros(2, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert confidence_argmax(logits) == "ref"
    if is_interpreted(mod._confidence_argmax_kernel):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert confidence_argmax(logits) == "triton"


@pytest.mark.parametrize("bad,match", [
    (dict(logits=torch.zeros(2, 4, dtype=torch.float64)), "float32, bfloat16 or float16"),
    (dict(logits=torch.zeros(2, 0)), "V >= 1"),
    (dict(temperature=-1.0), "finite number >= 0"),
    (dict(temperature=math.inf), "finite number >= 0"),
    (dict(temperature=0.5), "needs noise_u"),
    (dict(temperature=0.5, noise_u=torch.rand(2, 5, dtype=torch.float64)), "must match"),
    (dict(temperature=0.5, noise_u=torch.rand(2, 4)), "float64"),
    (dict(exclude_id=4), r"\[0, 4\)"),
    (dict(logits=torch.zeros(2, 1), exclude_id=0), "vocabulary of 1"),
    (dict(temperature=0.5, noise_u=torch.rand(2, 4, dtype=torch.float64), seed=1), "not both"),
    (dict(temperature=0.5, seed=-1), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(temperature=0.5, seed=1, offset=2**63), "offset must be"),
])
def test_invalid_arguments_raise_a_sentence(bad, match):
    args = dict(logits=torch.zeros(2, 4), temperature=0.0, noise_u=None, exclude_id=None) | bad
    for fn in (confidence_argmax_ref, confidence_argmax_triton):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(**args)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_vocab_on_gpu(dtype):
    logits = (4 * torch.randn(64, 131072, device="cuda")).to(dtype)
    u = torch.rand(64, 131072, dtype=torch.float64, device="cuda")
    for temperature in (0.0, 0.7):
        out = confidence_argmax_triton(logits, temperature, u if temperature else None)
        _assert_matches(out, confidence_argmax_ref(logits.cpu(), temperature, u.cpu() if temperature else None))
