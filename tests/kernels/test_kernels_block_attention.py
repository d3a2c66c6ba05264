"""block_attention: the Triton kernel vs its SDPA twin on ragged batches, the fused cache write, and the twin vs
the model's own attention, bit for bit.

Every kernel case runs on NaN/inf-poisoned garbage slots (left padding, stale slots past the block) and a
NaN-poisoned ``torch.empty``; the twin's expected output comes from the same problem with finite garbage, so
any garbage that leaks, or any output or partial the kernel forgets to write, fails the comparison. The cache
after the call must equal the twin's cache exactly.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nemotron_fast.kernels._common import is_interpreted
from nemotron_fast.kernels.block_attention import block_attention, block_attention_ref, block_attention_triton

from .tolerance import rel_rms

mod = importlib.import_module("nemotron_fast.kernels.block_attention")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Relative RMS error of the kernel against its twin in the same dtype (the acceptance bar).
REL_RMS_TOL = {F32: 1e-5, BF16: 1e-2, F16: 1e-2}

# (Hkv, group, L, D, starts, pads, dtype, causal, num_splits): a row's prefix is [pad, start). Ragged prefixes
# in 0..4096 with left padding, L in 1..64, GQA 1/4/8, D 64/128 plus odd sizes, splits that get no keys, query
# groups past one tile, blocks that straddle the left padding. Long prefixes go with few query rows.
CASES = [
    (1, 1, 1, 64, [0], [0], F32, False, None),                   # nothing cached, one token
    (1, 1, 1, 64, [4099, 17], [3, 0], F32, True, 4),              # 4096-key prefix, L = 1
    (1, 4, 7, 64, [0, 3, 135], [0, 2, 5], F32, True, 3),          # empty / 1-key prefixes: idle splits
    (1, 4, 7, 64, [0, 3, 135], [0, 2, 5], BF16, False, 3),
    (1, 8, 32, 128, [201, 64], [1, 0], F32, True, 2),             # 256 query rows: 8 fp32 query tiles
    (1, 8, 32, 128, [201, 64], [1, 0], BF16, False, 2),           # ... 2 bf16 query tiles
    (2, 4, 32, 128, [520], [7], BF16, True, 5),                   # the 8B's decode shape, GQA 4, L = 32
    (2, 4, 32, 128, [520], [7], BF16, False, None),
    (1, 1, 64, 64, [2048, 131], [0, 31], F32, False, 16),         # L = 64, row 2 leaves most splits idle
    (1, 4, 64, 64, [300, 0], [0, 0], BF16, True, 1),
    (1, 8, 64, 64, [35], [2], F32, True, 3),                      # 512 query rows: 16 fp32 query tiles
    (1, 1, 16, 128, [4096, 1001], [0, 1], BF16, False, 8),        # long bf16 prefixes
    (2, 1, 3, 72, [11, 50], [1, 0], F32, True, 2),                # odd head dim
    (2, 1, 3, 72, [11, 50], [1, 0], BF16, False, 1),
    (1, 4, 5, 40, [80], [3], F16, True, 3),                       # fp16, D = 40
    (1, 1, 2, 64, [0, 5, 64, 66], [0, 0, 0, 1], F32, False, 2),   # prefixes at tile boundaries
    (1, 4, 1, 64, [4096, 63], [1, 0], F32, True, 32),             # 32 splits, L = 1, GQA 4
    (1, 8, 7, 64, [128, 193], [0, 64], BF16, True, 4),
    (1, 1, 33, 64, [512], [0], F32, True, 3),                     # L = 33
    (1, 1, 64, 256, [100], [0], F32, True, 2),                    # D = 256: the block spans two key tiles
    (1, 4, 32, 128, [905, 303], [5, 3], F32, False, 6),
    (1, 4, 32, 128, [905, 303], [5, 3], F32, True, None),
    (1, 8, 1, 128, [3444], [111], BF16, False, 9),                # GQA 8, L = 1
    (1, 1, 7, 64, [4096, 0], [96, 0], BF16, True, 3),
    (4, 1, 1, 64, [100], [0], F32, False, 2),                     # plain MHA, 4 heads
    (1, 4, 16, 64, [64, 128], [0, 0], F32, True, 2),              # exact tile multiples
    (1, 4, 7, 64, [20], [20], F32, True, 2),                      # start == pad: empty prefix behind padding
    (1, 8, 16, 64, [1, 3], [0, 1], BF16, False, 3),
    (1, 1, 32, 64, [0, 1000, 4096], [0, 0, 0], F32, False, 8),
    (1, 4, 7, 128, [3000, 12], [0, 0], F32, True, 5),
    (1, 1, 1, 64, [1, 4096], [0, 4000], BF16, True, 2),
    (1, 8, 32, 64, [256], [0], F16, False, 2),
    (1, 4, 7, 64, [11], [2], F32, False, 64),                     # 64 splits, nearly all idle
    (1, 1, 7, 64, [6, 0], [10, 3], F32, True, 2),                 # blocks straddling the left padding
    (1, 4, 7, 64, [6, 0], [10, 3], F32, False, 3),
    (1, 4, 32, 64, [1500, 2], [2, 0], F16, True, 4),
]


def _case_id(case) -> str:
    hkv, group, length, dim, starts, pads, dtype, causal, splits = case
    kind = "causal" if causal else "bidir"
    return (f"B{len(starts)}-Hkv{hkv}-G{group}-L{length}-D{dim}-pre{max(s - p for s, p in zip(starts, pads))}-"
            f"{str(dtype).removeprefix('torch.')}-{kind}-s{splits}")


def _problem(hkv, group, length, dim, starts, pads, dtype, seed=0, extra=3):
    """Model-layout inputs: q/k_new/v_new as [B, L, H, D] transposed, both caches one slice each of a
    [2, B, Hkv, S, D] buffer. Returns (q, buf, k_new, v_new, start, pad, garbage) with ``garbage`` [B, S] bool
    marking the slots outside [pad, start)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(starts)
    slots = max(starts) + length + extra
    q = torch.randn(batch, length, hkv * group, dim, generator=g).to(dtype).transpose(1, 2)
    k_new = torch.randn(batch, length, hkv, dim, generator=g).to(dtype).transpose(1, 2)
    v_new = torch.randn(batch, length, hkv, dim, generator=g).to(dtype).transpose(1, 2)
    buf = torch.randn(2, batch, hkv, slots, dim, generator=g).to(dtype)
    start, pad = torch.tensor(starts), torch.tensor(pads)
    keys = torch.arange(slots)
    garbage = (keys < pad[:, None]) | (keys >= start[:, None])
    return q, buf, k_new, v_new, start, pad, garbage


def _poisoned(buf: torch.Tensor, garbage: torch.Tensor) -> torch.Tensor:
    # K garbage NaN, V garbage +inf (-inf on odd rows): any lane read without a mask shows up.
    out = buf.clone()
    rows = torch.arange(buf.shape[1])
    v_poison = torch.where(rows % 2 == 0, float("inf"), float("-inf")).to(buf.dtype)
    out[0] = torch.where(garbage[:, None, :, None], float("nan"), out[0])
    out[1] = torch.where(garbage[:, None, :, None], v_poison[:, None, None, None], out[1])
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN and inf included."""
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_kernel_matches_twin_on_ragged_batches(device, poison, case):
    hkv, group, length, dim, starts, pads, dtype, causal, splits = case
    q, buf, k_new, v_new, start, pad, garbage = _problem(hkv, group, length, dim, starts, pads, dtype)
    expected = block_attention_ref(q, *buf.clone(), k_new, v_new, start, pad, causal=causal)
    expected_cache = _poisoned(buf, garbage)
    block_attention_ref(q, *expected_cache, k_new, v_new, start, pad, causal=causal)

    cache = _poisoned(buf, garbage).to(device)
    with poison():
        out = block_attention_triton(q.to(device), cache[0], cache[1], k_new.to(device), v_new.to(device),
                                     start.to(device), pad.to(device), causal=causal, num_splits=splits)
    out = out.cpu()
    assert out.dtype == dtype and out.shape == expected.shape and out.transpose(1, 2).is_contiguous()
    assert not out.isnan().any() and not out.isinf().any(), "an output element was not written or saw garbage"
    err = rel_rms(out, expected)
    assert err <= REL_RMS_TOL[dtype], f"relative RMS error {err:.3e} > {REL_RMS_TOL[dtype]:.0e} ({dtype})"
    assert _same(cache.cpu(), expected_cache), "the cache differs from the twin's (block slots or untouched slots)"


def test_bf16_error_against_an_fp32_truth(device):
    # Both bf16 paths against the fp32 twin on the decode shape. The flash-attention bar (at most 2x torch's own
    # error) plus one bf16 ulp at 1.0: the kernel rounds the softmax weights P to bf16 for the second matmul, as
    # FlashAttention (and CUDA's SDPA kernels) do, while torch's CPU kernel keeps them in fp32.
    q, buf, k_new, v_new, start, pad, _ = _problem(2, 4, 32, 128, [400, 37], [0, 5], BF16, seed=3)
    up = [t.float() for t in (q, *buf, k_new, v_new)]
    truth = block_attention_ref(*up, start, pad, causal=False)
    torch_err = rel_rms(block_attention_ref(q, *buf.clone(), k_new, v_new, start, pad, causal=False), truth)
    kernel = block_attention_triton(q.to(device), *buf.clone().to(device), k_new.to(device), v_new.to(device),
                                    start.to(device), pad.to(device), causal=False, num_splits=2).cpu()
    assert rel_rms(kernel, truth) <= 2 * torch_err + 2**-8


def test_split_counts_agree(device):
    # The partition of the prefix must not matter beyond fp32 summation order.
    q, buf, k_new, v_new, start, pad, _ = _problem(1, 4, 7, 64, [500, 70], [3, 0], F32, seed=5)
    outs = [block_attention_triton(q.to(device), *buf.clone().to(device), k_new.to(device), v_new.to(device),
                                   start.to(device), pad.to(device), causal=True, num_splits=s).cpu()
            for s in (1, 2, 5, 17)]
    for out in outs[1:]:
        assert rel_rms(out, outs[0]) <= 1e-6


def test_scale_argument(device):
    q, buf, k_new, v_new, start, pad, _ = _problem(1, 4, 7, 64, [90], [4], F32, seed=6)
    expected = block_attention_ref(q, *buf.clone(), k_new, v_new, start, pad, causal=False, scale=0.3)
    out = block_attention_triton(q.to(device), *buf.clone().to(device), k_new.to(device), v_new.to(device),
                                 start.to(device), pad.to(device), causal=False, scale=0.3, num_splits=2)
    assert rel_rms(out.cpu(), expected) <= 1e-5
    assert rel_rms(expected, block_attention_ref(q, *buf.clone(), k_new, v_new, start, pad, causal=False)) > 1e-3


def test_cache_view_with_any_strides(device):
    # A [S, B, Hkv, D]-ordered buffer viewed as [B, Hkv, S, D]: no stride is the contiguous one.
    q, buf, k_new, v_new, start, pad, _ = _problem(2, 4, 7, 64, [40, 9], [2, 0], F32, seed=7)
    odd = buf.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)
    assert odd.stride() != buf.stride() and torch.equal(odd, buf)
    expected_cache = buf.clone()
    expected = block_attention_ref(q, *expected_cache, k_new, v_new, start, pad, causal=True)
    odd = odd.to(device)
    out = block_attention_triton(q.to(device), odd[0], odd[1], k_new.to(device), v_new.to(device), start.to(device),
                                 pad.to(device), causal=True, num_splits=2)
    assert rel_rms(out.cpu(), expected) <= 1e-5
    assert torch.equal(odd.cpu(), expected_cache)


def test_out_of_range_row_is_skipped_by_the_kernel_and_refused_by_the_twin(device, poison):
    # start is never read back on the host: a block past the cache's end is dropped, its output rows are 0,
    # and the other rows are unaffected.
    q, buf, k_new, v_new, _, pad, _ = _problem(1, 4, 7, 64, [30, 20], [0, 0], F32, seed=8)
    slots = buf.shape[3]
    bad = torch.tensor([30, slots - 3])
    cache = buf.clone().to(device)
    with poison():
        out = block_attention_triton(q.to(device), cache[0], cache[1], k_new.to(device), v_new.to(device),
                                     bad.to(device), pad.to(device), causal=False, num_splits=2).cpu()
    expected_cache = buf.clone()
    expected = block_attention_ref(q[:1], expected_cache[0, :1], expected_cache[1, :1], k_new[:1], v_new[:1],
                                   bad[:1], pad[:1], causal=False)
    assert rel_rms(out[:1], expected) <= 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(cache.cpu(), expected_cache)
    with pytest.raises(ValueError, match=r"row 1's block slots \[\d+, \d+\) do not fit"):
        block_attention_ref(q, *buf.clone(), k_new, v_new, bad, pad, causal=False)
    with pytest.raises(ValueError, match="row 0's pad is -1"):
        block_attention_ref(q, *buf.clone(), k_new, v_new, torch.tensor([30, 20]), torch.tensor([-1, 0]),
                            causal=False)


def test_head_dim_over_the_kernel_limit_is_refused(device):
    q, buf, k_new, v_new, start, pad, _ = _problem(1, 1, 1, 264, [4], [0], F32)
    with pytest.raises(ValueError, match="head dim 264 exceeds the kernel's 256; use block_attention_ref"):
        block_attention_triton(q.to(device), *buf.to(device), k_new.to(device), v_new.to(device), start.to(device),
                               pad.to(device), causal=True)
    block_attention_ref(q, *buf, k_new, v_new, start, pad, causal=True)


def test_dispatcher_routes_by_device_and_interpreter(monkeypatch):
    monkeypatch.setattr(mod, "block_attention_ref", lambda *a, **k: "ref")
    monkeypatch.setattr(mod, "block_attention_triton", lambda *a, **k: "triton")
    q, buf, k_new, v_new, start, pad, _ = _problem(1, 1, 1, 16, [2], [0], F32)
    args = (q, *buf, k_new, v_new, start, pad)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert block_attention(*args, causal=True) == "ref"
    if is_interpreted(mod._block_attention_kernel):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert block_attention(*args, causal=True) == "triton"


def _bad_inputs() -> tuple[dict, list[tuple[dict, str]]]:
    q, buf, k_new, v_new, start, pad, _ = _problem(2, 1, 3, 16, [5, 6], [0, 1], F32)
    kc, vc = buf
    good = dict(q=q, k_cache=kc, v_cache=vc, k_new=k_new, v_new=v_new, start=start, pad=pad, causal=True)
    rand = torch.randn
    return good, [
        ({"q": q[0]}, "q must have 4 dims"),
        ({"k_cache": kc[:, :, :, :8]}, "k_cache .* and v_cache .* must match"),
        ({"k_cache": kc[:1], "v_cache": vc[:1]}, r"must be \[B, Hkv, S_max, D\] with B = 2"),
        ({"k_new": k_new[:, :, :2]}, r"k_new has shape .* must be \[B, Hkv, L, D\]"),
        ({"q": rand(2, 3, 3, 16)}, "3 heads are not a multiple of the cache's 2 kv-heads"),
        ({"q": rand(2, 2, 40, 16), "k_new": rand(2, 2, 40, 16), "v_new": rand(2, 2, 40, 16)},
         "a block of 40 tokens does not fit a cache of 12 slots"),
        ({"q": q.double()}, "q must be float32, bfloat16 or float16"),
        ({"v_new": v_new.half()}, "v_new is torch.float16 but q is torch.float32"),
        ({"start": start.float()}, r"start must be an int64 \(or int32\) tensor of shape \[2\]"),
        ({"pad": pad[:1]}, r"pad must be an int64 \(or int32\) tensor of shape \[2\]"),
        ({"pad": torch.empty(2, dtype=torch.int64, device="meta")}, "pad is on meta but q is on cpu"),
        ({"start": [5, 6]}, "start must be a torch.Tensor"),
        ({"causal": 1}, "causal must be a bool"),
        ({"scale": -1.0}, "scale must be None or a finite float > 0"),
        ({"num_splits": 0}, r"num_splits must be None or an int in \[1, 1024\]"),
    ]


GOOD_ARGS, BAD_ARGS = _bad_inputs()


@pytest.mark.parametrize("change,match", BAD_ARGS, ids=[f"bad{i}" for i in range(len(BAD_ARGS))])
def test_invalid_arguments_raise_a_sentence(change, match):
    # On CPU tensors: the checks come before anything is launched, on every path.
    kwargs = {**GOOD_ARGS, **change}
    fns = [block_attention_triton] if "num_splits" in change else [block_attention_ref, block_attention_triton]
    for fn in fns:
        with pytest.raises((ValueError, TypeError), match=match):
            fn(**kwargs)


def _model_attention(q, kc, vc, k_new, v_new, start: int, pad, mode):
    # What Attention.forward + NLDModel._cache_mask compute today for one shared start (the decode path).
    from nemotron_fast.model.nld import NLDModel

    cache = SimpleNamespace(k=kc, pad=pad, has_pad=bool((pad != 0).any()))
    mask = NLDModel._cache_mask(cache, start, q.shape[2], mode)
    length = q.shape[2]
    kc[:, :, start:start + length] = k_new
    vc[:, :, start:start + length] = v_new
    k, v = kc[:, :, :start + length], vc[:, :, :start + length]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kc.shape[1] != q.shape[1])


def _model_rows_attention(q, kc, vc, k_new, v_new, row_start: list[int], pad, mode):
    # The same for per-row starts (Attention.forward's slots path + NLDModel._rows_mask).
    from nemotron_fast.model.nld import NLDModel

    b, length = q.shape[0], q.shape[2]
    span = max(row_start) + length
    first = torch.tensor(row_start)
    slots = first[:, None] + torch.arange(length)
    mask = NLDModel._rows_mask(SimpleNamespace(pad=pad), first, slots, span, mode)
    rows = torch.arange(b)[:, None]
    kc[rows, :, slots] = k_new.transpose(1, 2)
    vc[rows, :, slots] = v_new.transpose(1, 2)
    return F.scaled_dot_product_attention(q, kc[:, :, :span], vc[:, :, :span], attn_mask=mask,
                                          enable_gqa=kc.shape[1] != q.shape[1])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("mode", ["causal", "diffusion"])
@pytest.mark.parametrize("pads,group,length", [([0, 0], 4, 7), ([3, 0], 4, 7), ([0, 0], 1, 1), ([5, 2], 8, 32)])
def test_twin_is_bit_exact_with_the_model_attention(dtype, mode, pads, group, length):
    start = 40
    q, buf, k_new, v_new, _, pad, _ = _problem(2, group, length, 64, [start, start], pads, dtype, seed=9)
    model_cache, twin_cache = buf.clone(), buf.clone()
    expected = _model_attention(q, *model_cache, k_new, v_new, start, pad, mode)
    out = block_attention_ref(q, *twin_cache, k_new, v_new, torch.tensor([start, start]), pad,
                              causal=mode == "causal")
    assert torch.equal(out, expected)
    assert torch.equal(twin_cache, model_cache)


@pytest.mark.parametrize("mode", ["causal", "diffusion"])
def test_twin_is_bit_exact_with_the_model_on_per_row_starts(mode):
    row_start = [40, 23]
    q, buf, k_new, v_new, _, pad, _ = _problem(2, 4, 7, 64, row_start, [3, 0], F32, seed=10)
    model_cache, twin_cache = buf.clone(), buf.clone()
    expected = _model_rows_attention(q, *model_cache, k_new, v_new, row_start, pad, mode)
    out = block_attention_ref(q, *twin_cache, k_new, v_new, torch.tensor(row_start), pad, causal=mode == "causal")
    assert torch.equal(out, expected)
    assert torch.equal(twin_cache, model_cache)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("causal", [False, True])
def test_real_decode_shape_on_gpu(causal):
    # The 8B's attention: 32 query heads, 8 kv-heads, D 128, a 32-token block, bf16, ragged prefixes.
    q, buf, k_new, v_new, start, pad, garbage = _problem(8, 4, 32, 128, [1024, 1500, 33, 4096], [0, 17, 0, 900],
                                                         BF16, seed=11)
    expected_cache = buf.clone()
    expected = block_attention_ref(q, *expected_cache, k_new, v_new, start, pad, causal=causal)
    cache = _poisoned(buf, garbage).cuda()
    out = block_attention(q.cuda(), *cache, k_new.cuda(), v_new.cuda(), start.cuda(), pad.cuda(), causal=causal)
    assert rel_rms(out.cpu(), expected) <= REL_RMS_TOL[BF16]
    written = ~garbage.clone()
    for b, s in enumerate(start.tolist()):
        written[b, s:s + 32] = True
    assert torch.equal(cache.cpu()[:, written[:, None, :].expand(-1, 8, -1)],
                       expected_cache[:, written[:, None, :].expand(-1, 8, -1)])


@pytest.mark.requires_gpu
def test_one_cuda_graph_serves_every_prefix_length():
    # start/pad live in device tensors: a graph captured once replays correctly after they change.
    q, buf, k_new, v_new, start, pad, _ = _problem(8, 4, 32, 128, [300, 40], [0, 3], BF16, seed=12, extra=900)
    q, k_new, v_new, cache = q.cuda(), k_new.cuda(), v_new.cuda(), buf.clone().cuda()
    start_d, pad_d = start.cuda(), pad.cuda()
    block_attention(q, *cache, k_new, v_new, start_d, pad_d, causal=False)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block_attention(q, *cache, k_new, v_new, start_d, pad_d, causal=False)
    for starts in ([300, 40], [1000, 7], [33, 1200]):
        start_d.copy_(torch.tensor(starts))
        graph.replay()
        expected = block_attention_ref(q.cpu(), *cache.cpu().clone(), k_new.cpu(), v_new.cpu(), torch.tensor(starts),
                                       pad, causal=False)
        assert rel_rms(out.cpu(), expected) <= REL_RMS_TOL[BF16]
