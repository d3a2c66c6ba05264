"""head_confidence_argmax: the head matmul fused with confidence/argmax, vs ``confidence_argmax_ref(F.linear)``.

Exact token checks use small-integer hidden states and weights: their dot products are exact in any
summation order, so the fused kernel, the chunked reference and F.linear see bit-identical logits. Random
data checks the continuous outputs and that any token change is a genuine near-tie.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemotron_fast.kernels import head_confidence as mod
from nemotron_fast.kernels._common import is_interpreted
from nemotron_fast.kernels._philox import philox_uniform64_ref
from nemotron_fast.kernels.confidence import confidence_argmax_ref
from nemotron_fast.kernels.head_confidence import (
    head_confidence_argmax,
    head_confidence_argmax_ref,
    head_confidence_argmax_triton,
)

from .tolerance import assert_at_most_2x_torch_error, assert_conf_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, V, H): V = 1, N = 1, N not a multiple of BLOCK_N, V and H not multiples of their tiles.
SHAPES = [(1, 1, 16), (1, 40, 8), (19, 300, 40), (5, 1000, 24)]


def _integer_problem(rows: int, vocab: int, width: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (rows, width), generator=g).to(dtype)
    weight = torch.randint(-2, 3, (vocab, width), generator=g).to(dtype)
    u = torch.rand(rows, vocab, dtype=torch.float64, generator=g)
    return hidden, weight, u


def _ground_truth(hidden, weight, temperature=0.0, u=None, exclude_id=None):
    return confidence_argmax_ref(F.linear(hidden, weight), temperature, u, exclude_id)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab,width", SHAPES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_triton_matches_ground_truth(device, poison, dtype, rows, vocab, width, temperature):
    hidden, weight, u = _integer_problem(rows, vocab, width, dtype)
    expected = _ground_truth(hidden, weight, temperature, u)
    with poison():
        x0, conf = head_confidence_argmax_triton(hidden.to(device), weight.to(device), temperature, u.to(device),
                                                 num_splits=3, block_n=16, block_v=64, block_k=16)
    assert torch.equal(x0.cpu(), expected[0])
    assert_conf_close(conf.cpu(), expected[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab,width", SHAPES)
@pytest.mark.parametrize("chunk", [97, 128, 8192])
def test_chunked_ref_matches_ground_truth(dtype, rows, vocab, width, chunk):
    hidden, weight, u = _integer_problem(rows, vocab, width, dtype, seed=1)
    for temperature in (0.0, 1.0):
        expected = _ground_truth(hidden, weight, temperature, u)
        x0, conf = head_confidence_argmax_ref(hidden, weight, temperature, u, chunk=chunk)
        assert torch.equal(x0, expected[0])
        assert_conf_close(conf, expected[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_seeded_noise_matches_the_rebuilt_draw(device, poison, dtype, temperature):
    hidden, weight, _ = _integer_problem(19, 300, 40, dtype, seed=7)
    seed, offset = 2**40 + 5, 123
    expected = _ground_truth(hidden, weight, temperature, philox_uniform64_ref(seed, offset, (19, 300)))
    with poison():
        x0, conf = head_confidence_argmax_triton(hidden.to(device), weight.to(device), temperature, seed=seed,
                                                 offset=offset, num_splits=3, block_n=16, block_v=64)
    assert torch.equal(x0.cpu(), expected[0])
    assert_conf_close(conf.cpu(), expected[1])
    x0, conf = head_confidence_argmax_ref(hidden, weight, temperature, seed=seed, offset=offset, chunk=97)
    assert torch.equal(x0, expected[0])
    assert_conf_close(conf, expected[1])


@pytest.mark.parametrize("exclude", [0, 3, 299])
def test_exclude_id(device, exclude):
    hidden, weight, u = _integer_problem(6, 300, 24, torch.float32, seed=2)
    weight[exclude] = 2.0  # the excluded row would win every argmax
    for temperature in (0.0, 0.7):
        expected = _ground_truth(hidden, weight, temperature, u, exclude)
        assert not (expected[0] == exclude).any()
        got_ref = head_confidence_argmax_ref(hidden, weight, temperature, u, exclude, chunk=64)
        got = head_confidence_argmax_triton(hidden.to(device), weight.to(device), temperature, u.to(device),
                                            exclude, num_splits=2, block_v=64)
        for x0, conf in (got_ref, got):
            assert torch.equal(x0.cpu(), expected[0])
            assert_conf_close(conf.cpu(), expected[1])


@pytest.mark.parametrize("exclude", [0, 2, 4])
def test_chunked_ref_with_single_column_chunks(exclude):
    hidden, weight, u = _integer_problem(4, 5, 8, torch.float32, seed=6)
    weight[exclude] = 2.0
    for temperature in (0.0, 0.7):
        expected = _ground_truth(hidden, weight, temperature, u, exclude)
        x0, conf = head_confidence_argmax_ref(hidden, weight, temperature, u, exclude, chunk=1)
        assert torch.equal(x0, expected[0])
        assert_conf_close(conf, expected[1])


def test_ties_go_to_the_lowest_index(device):
    hidden = torch.ones(3, 16)
    weight = torch.zeros(200, 16)
    weight[[150, 70, 199]] = 1.0
    expected = [70, 70, 70]
    assert head_confidence_argmax_ref(hidden, weight, chunk=64)[0].tolist() == expected
    x0, _ = head_confidence_argmax_triton(hidden.to(device), weight.to(device), num_splits=3, block_v=32)
    assert x0.cpu().tolist() == expected
    x0, _ = head_confidence_argmax_triton(hidden.to(device), torch.zeros(200, 16, device=device))
    assert x0.cpu().tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_batched_inputs(device, poison, dtype):
    hidden, weight, u = _integer_problem(6, 150, 48, dtype, seed=3)
    hidden_strided = torch.zeros(6, 96, dtype=dtype)[:, ::2]  # column stride 2
    hidden_strided.copy_(hidden)
    weight_colmajor = weight.t().contiguous().t()  # row stride 1, column stride V
    hidden_batched = hidden.view(2, 3, 48)
    expected = _ground_truth(hidden, weight, 0.7, u)
    for h in (hidden_strided, hidden_batched):
        with poison():
            x0, conf = head_confidence_argmax_triton(h.to(device), weight_colmajor.to(device), 0.7,
                                                     u.view(*h.shape[:-1], 150).to(device), num_splits=2)
        assert x0.shape == h.shape[:-1]
        assert torch.equal(x0.cpu().flatten(), expected[0])
        assert_conf_close(conf.cpu().flatten(), expected[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_data_within_rounding_of_the_float64_truth(device, dtype):
    # Different summation orders may round a logit to a neighbouring value of the dtype, so on random data the
    # token must be a float64 argmax up to that rounding, and conf's error obeys the 2x-torch bar.
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(17, 96, generator=g).to(dtype)
    weight = (torch.randn(700, 96, generator=g) / 10).to(dtype)
    truth_logits = F.linear(hidden.double(), weight.double())
    x0, conf = head_confidence_argmax_triton(hidden.to(device), weight.to(device), num_splits=3)
    x0, conf = x0.cpu(), conf.cpu()
    picked = truth_logits.gather(1, x0[:, None]).squeeze(1)
    best = truth_logits.max(1).values
    assert ((best - picked) <= 2 * torch.finfo(dtype).eps * best.abs().clamp_min(1)).all()
    ref_x0, ref_conf = confidence_argmax_ref(F.linear(hidden, weight))
    assert (x0 == ref_x0).float().mean() >= 0.9
    truth = torch.softmax(truth_logits, -1).gather(1, x0[:, None]).squeeze(1)
    plain = torch.softmax(F.linear(hidden, weight), -1, dtype=torch.float32).gather(1, x0[:, None]).squeeze(1)
    assert_at_most_2x_torch_error(conf, plain.to(dtype), truth)


def test_dispatcher_routes_by_device_and_interpreter(monkeypatch):
    monkeypatch.setattr(mod, "head_confidence_argmax_ref", lambda *a, **kw: "ref")
    monkeypatch.setattr(mod, "head_confidence_argmax_triton", lambda *a, **kw: "triton")
    hidden, weight = torch.zeros(2, 4), torch.zeros(3, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert head_confidence_argmax(hidden, weight) == "ref"
    if is_interpreted(mod._head_confidence_argmax_kernel):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert head_confidence_argmax(hidden, weight) == "triton"


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.zeros(3)), r"\[V, H\]"),
    (dict(hidden=torch.zeros(2, 5)), "H = 4"),
    (dict(hidden=torch.zeros(2, 4, dtype=torch.float16)), "must match"),
    (dict(hidden=torch.zeros(2, 4, dtype=torch.float64), weight=torch.zeros(3, 4, dtype=torch.float64)),
     "float32, bfloat16 or float16"),
    (dict(temperature=0.5), "needs noise_u"),
    (dict(temperature=0.5, noise_u=torch.rand(2, 4, dtype=torch.float64)), "must match"),
    (dict(exclude_id=3), r"\[0, 3\)"),
])
def test_invalid_arguments_raise_a_sentence(bad, match):
    args = dict(hidden=torch.zeros(2, 4), weight=torch.zeros(3, 4), temperature=0.0, noise_u=None,
                exclude_id=None) | bad
    for fn in (head_confidence_argmax_ref, head_confidence_argmax_triton):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(**args)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_real_head_size_on_gpu(dtype):
    hidden, weight, u = _integer_problem(32, 131072, 512, dtype, seed=5)
    hidden, weight, u = hidden.cuda(), weight.cuda(), u.cuda()
    for temperature in (0.0, 0.7):
        expected = _ground_truth(hidden, weight, temperature, u)
        x0, conf = head_confidence_argmax_triton(hidden, weight, temperature, u)
        assert torch.equal(x0, expected[0])
        assert_conf_close(conf.cpu(), expected[1].cpu())


def test_tensor_offset_is_read_at_launch(device):
    # An int64 device offset gives the int offset's draw, and advancing it in place moves the draw (what a
    # replayed CUDA graph relies on).
    hidden, weight, _ = _integer_problem(5, 300, 24, torch.float32, seed=8)
    hidden, weight = hidden.to(device), weight.to(device)
    seed = 77
    offset = torch.tensor([40], dtype=torch.int64, device=device)
    for _ in range(2):
        at = int(offset.item())
        expected = _ground_truth(hidden.cpu(), weight.cpu(), 0.9, philox_uniform64_ref(seed, at, (5, 300)))
        x0, _ = head_confidence_argmax_triton(hidden, weight, 0.9, seed=seed, offset=offset, num_splits=2,
                                              block_v=64)
        assert torch.equal(x0.cpu(), expected[0])
        assert torch.equal(x0.cpu(), head_confidence_argmax_ref(hidden.cpu(), weight.cpu(), 0.9, seed=seed,
                                                                offset=offset.cpu())[0])
        offset.add_(5 * 300)
    with pytest.raises(ValueError, match="offset tensor must be int64"):
        head_confidence_argmax_triton(hidden, weight, 0.9, seed=seed, offset=offset.int())


def test_philox_gumbel_samples_softmax_over_t(device):
    # In-kernel Philox noise, fixed seed: the chosen-token frequencies of 3000 identical rows follow
    # softmax(logits / T) (chi-square, 5 dof, cut at p ~ 1e-4). Deterministic: the draw is a function of the seed.
    temperature, draws = 0.8, 3000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 1.0])
    weight = torch.zeros(6, 16)
    weight[:, 0] = logits
    hidden = torch.zeros(draws, 16)
    hidden[:, 0] = 1.0  # every row's logits are exactly ``logits``
    x0, _ = head_confidence_argmax_triton(hidden.to(device), weight.to(device), temperature, seed=2024, offset=0,
                                          num_splits=1, block_n=64, block_v=16, block_k=16)
    counts = torch.bincount(x0.cpu(), minlength=6).double()
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.7, f"chi-square {chi2:.1f}: counts {counts.tolist()} vs expected {expected.tolist()}"
    # the same noise injected gives the same tokens
    u = philox_uniform64_ref(2024, 0, (draws, 6))
    assert torch.equal(x0.cpu(), _ground_truth(hidden, weight, temperature, u)[0])


def test_tuned_configs_share_one_vocabulary_split():
    for cfg in mod._TUNE_CONFIGS:
        kw = cfg.kwargs
        assert mod._SPLIT_QUANTUM % kw["BLOCK_V"] == 0, kw
        assert all(b >= 16 and b & (b - 1) == 0 for b in (kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_K"])), kw
    small = mod._prune_configs(mod._TUNE_CONFIGS, {"N": 1})
    assert small and all(c.kwargs["BLOCK_N"] == 16 for c in small)
    assert len(mod._prune_configs(mod._TUNE_CONFIGS, {"N": 4096})) == len(mod._TUNE_CONFIGS)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("rows", [1, 32, 256])
def test_autotuned_launch_matches_ground_truth_on_gpu(rows):
    hidden, weight, _ = _integer_problem(rows, 131072, 4096, torch.bfloat16, seed=9)
    hidden, weight = hidden.cuda(), weight.cuda()
    for kwargs in (dict(temperature=0.0), dict(temperature=0.7, seed=5, offset=11)):
        u = philox_uniform64_ref(5, 11, (rows, 131072), "cuda") if kwargs["temperature"] else None
        expected = _ground_truth(hidden, weight, kwargs["temperature"], u)
        x0, conf = head_confidence_argmax_triton(hidden, weight, **kwargs)
        assert torch.equal(x0, expected[0])
        assert_conf_close(conf.cpu(), expected[1].cpu())
