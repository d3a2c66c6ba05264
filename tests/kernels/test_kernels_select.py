"""select_unmask: the vectorised reference (the CPU path) and, on a GPU, the dispatcher's CUDA path (the csrc/
kernel through torch.ops) vs a per-row Python oracle, all exact."""

from __future__ import annotations

import pytest
import torch

from nemotron_fast.kernels import unmask as mod
from nemotron_fast.kernels.unmask import round_threshold, select_unmask, select_unmask_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 7), (2, 32), (3, 40)]
POLICIES = [None, 0.0, 0.5, 0.9, 1.0, "force_all"]


def _oracle(x0, conf, block, is_mask, threshold, k, active, force_all):
    """The rule spelled out row by row: candidates sorted by (-conf, position) with Python's sorted()."""
    block, is_mask = block.clone(), is_mask.clone()
    revealed = torch.zeros_like(is_mask)
    thr = None if threshold is None else round_threshold(threshold, conf.dtype)
    for b in range(x0.shape[0]):
        if active is not None and not active[b]:
            continue
        cand = sorted((i for i in range(x0.shape[1]) if is_mask[b, i]), key=lambda i: (-conf[b, i].item(), i))
        if force_all:
            chosen = cand
        elif threshold is None:
            chosen = cand[: max(0, int(k[b]))]
        else:
            chosen = cand[:1] + [i for i in cand[1:] if conf[b, i].item() >= thr]
        for i in chosen:
            revealed[b, i] = True
            block[b, i] = x0[b, i]
            is_mask[b, i] = False
    return revealed, block, is_mask


def _problem(batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 1000, (batch, length), generator=g)
    # Few distinct values so that ties are common.
    conf = (torch.randint(1, 9, (batch, length), generator=g) / 8).to(dtype)
    block = torch.randint(0, 1000, (batch, length), generator=g)
    is_mask = torch.rand(batch, length, generator=g) < 0.7
    k = torch.randint(0, length + 2, (batch,), generator=g)
    active = torch.rand(batch, generator=g) < 0.8
    active[0] = True
    return x0, conf, block, is_mask, k, active


def _run(fn, device, x0, conf, block, is_mask, policy, k, active, poison=None):
    threshold = None if policy in (None, "force_all") else policy
    block, is_mask = block.clone().to(device), is_mask.clone().to(device)
    args = (x0.to(device), conf.to(device), block, is_mask)
    kwargs = dict(threshold=threshold, k=k.to(device), active=None if active is None else active.to(device),
                  force_all=policy == "force_all")
    if poison is None:
        revealed = fn(*args, **kwargs)
    else:
        with poison():
            revealed = fn(*args, **kwargs)
    return revealed.cpu(), block.cpu(), is_mask.cpu()


def _assert_same(got, expected):
    for name, a, b in zip(("revealed", "block", "is_mask"), got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}:\n{a}\n!=\n{b}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,length", SHAPES)
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_kernel_and_ref_match_the_oracle(device, poison, dtype, batch, length, policy):
    x0, conf, block, is_mask, k, active = _problem(batch, length, dtype, seed=batch * 100 + length)
    threshold = None if policy in (None, "force_all") else policy
    expected = _oracle(x0, conf, block, is_mask, threshold, k, active, policy == "force_all")
    _assert_same(_run(select_unmask_ref, "cpu", x0, conf, block, is_mask, policy, k, active), expected)
    _assert_same(_run(select_unmask, device, x0, conf, block, is_mask, policy, k, active, poison), expected)


@pytest.mark.parametrize("fn", [select_unmask_ref, select_unmask], ids=lambda f: f.__name__)
def test_bf16_threshold_rounds_like_upstream(device, fn):
    # conf 0.8984375 = bf16(0.9): revealed at threshold 0.9 in bf16, not in fp32 (fp32(0.9) > 0.8984375).
    dev = "cpu" if fn is select_unmask_ref else device
    assert round_threshold(0.9, torch.bfloat16) == 0.8984375
    for dtype, expected in ((torch.bfloat16, [True, True, False]), (torch.float32, [True, False, False])):
        conf = torch.tensor([[0.95, 0.8984375, 0.5]]).to(dtype)
        x0 = torch.tensor([[7, 8, 9]])
        revealed, block, is_mask = _run(fn, dev, x0, conf, torch.full((1, 3), 100), torch.ones(1, 3, dtype=torch.bool),
                                        0.9, torch.zeros(1, dtype=torch.long), None)
        assert revealed[0].tolist() == expected
        assert block[0].tolist() == [7, 8 if expected[1] else 100, 100]


@pytest.mark.parametrize("fn", [select_unmask_ref, select_unmask], ids=lambda f: f.__name__)
def test_forced_top1_is_the_lowest_of_equal_confidences(device, fn):
    dev = "cpu" if fn is select_unmask_ref else device
    conf = torch.tensor([[0.3, 0.7, 0.2, 0.7, 0.7]])
    is_mask = torch.tensor([[True, False, True, True, True]])  # position 1 is not masked: never a candidate
    revealed, *_ = _run(fn, dev, torch.arange(5)[None], conf, torch.zeros(1, 5, dtype=torch.long), is_mask, 1.0,
                        torch.zeros(1, dtype=torch.long), None)
    assert revealed[0].tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("fn", [select_unmask_ref, select_unmask], ids=lambda f: f.__name__)
def test_top_k_edges(device, fn):
    dev = "cpu" if fn is select_unmask_ref else device
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.5, 0.9, 0.5, 0.1], [0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]])
    is_mask = torch.tensor([[True, True, True, False]] * 3 + [[True] * 4])
    k = torch.tensor([2, 0, 10, 3])
    active = torch.tensor([True, True, True, True])
    revealed, block, mask_after = _run(fn, dev, torch.full((4, 4), 5), conf, torch.zeros(4, 4, dtype=torch.long),
                                       is_mask, None, k, active)
    assert revealed.tolist() == [[True, True, False, False],  # 0.9, then the lower of the two 0.5s
                                 [False] * 4,  # k = 0
                                 [True, True, True, False],  # k > masks: every mask, never an unmasked slot
                                 [True, True, True, False]]  # all equal: the lowest positions
    assert torch.equal(mask_after, is_mask & ~revealed)
    assert torch.equal(block, torch.where(revealed, 5, 0))


@pytest.mark.parametrize("fn", [select_unmask_ref, select_unmask], ids=lambda f: f.__name__)
def test_inactive_rows_are_untouched(device, fn):
    dev = "cpu" if fn is select_unmask_ref else device
    x0, conf, block, is_mask, k, _ = _problem(3, 9, torch.float32, seed=3)
    active = torch.tensor([False, True, False])
    for policy in POLICIES:
        revealed, block2, mask2 = _run(fn, dev, x0, conf, block, is_mask, policy, k, active)
        assert not revealed[[0, 2]].any()
        assert torch.equal(block2[[0, 2]], block[[0, 2]]) and torch.equal(mask2[[0, 2]], is_mask[[0, 2]])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views_are_updated_in_place(device, dtype):
    x0, conf, block, is_mask, k, active = _problem(3, 7, dtype, seed=4)
    expected = _oracle(x0, conf, block, is_mask, 0.5, k, active, False)
    # block and is_mask as column slices of a whole-sequence buffer, conf as a transposed view, x0 strided.
    seq = torch.zeros(3, 20, dtype=torch.long)
    seq[:, 5:12] = block
    mask_seq = torch.zeros(3, 20, dtype=torch.bool)
    mask_seq[:, 5:12] = is_mask
    seq, mask_seq = seq.to(device), mask_seq.to(device)
    conf_t = conf.t().contiguous().to(device).t()
    x0_s = torch.stack([x0, x0], -1).to(device)[..., 0]
    revealed = select_unmask(x0_s, conf_t, seq[:, 5:12], mask_seq[:, 5:12], threshold=0.5,
                                    active=active.to(device))
    _assert_same((revealed.cpu(), seq[:, 5:12].cpu(), mask_seq[:, 5:12].cpu()), expected)
    assert not seq[:, :5].any() and not seq[:, 12:].any() and not mask_seq[:, 12:].any()


def test_no_k_needed_with_threshold_or_force_all(device):
    x0, conf, block, is_mask, _, _ = _problem(2, 5, torch.float32)
    for kwargs in (dict(threshold=0.5), dict(threshold=None, force_all=True)):
        outs = []
        for fn in (select_unmask_ref, select_unmask):
            dev = "cpu" if fn is select_unmask_ref else device
            b, m = block.clone().to(dev), is_mask.clone().to(dev)
            outs.append((fn(x0.to(dev), conf.to(dev), b, m, **kwargs).cpu(), b.cpu(), m.cpu()))
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        if kwargs.get("force_all"):
            assert not outs[0][2].any()


def test_dispatcher_routes_cpu_to_the_reference_and_cuda_to_the_op(monkeypatch):
    from nemotron_fast import _ops

    monkeypatch.setattr(mod, "select_unmask_ref", lambda *a, **kw: "ref")
    monkeypatch.setattr(_ops, "select_unmask", lambda *a, **kw: "op")
    args = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.bool))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # no Triton kernel here: the interpreter changes nothing
    assert select_unmask(*args, threshold=0.5) == "ref"
    meta = tuple(t.to("meta") for t in args)
    assert select_unmask(*meta, threshold=0.5) == "ref"
    if torch.cuda.is_available():
        assert select_unmask(*(t.cuda() for t in args), threshold=0.5) == "op"


@pytest.mark.parametrize("bad,match", [
    (dict(x0=torch.zeros(2, dtype=torch.long)), r"\[B, L\]"),
    (dict(conf=torch.zeros(2, 4)), "must match"),
    (dict(block=torch.zeros(2, 3)), "int64"),
    (dict(conf=torch.zeros(2, 3, dtype=torch.float64)), "float32, bfloat16 or float16"),
    (dict(is_mask=torch.zeros(2, 3, dtype=torch.uint8)), "bool"),
    (dict(threshold=None), "needs k"),
    (dict(threshold=None, k=torch.zeros(3, dtype=torch.long)), r"shape \[2\]"),
    (dict(active=torch.ones(2)), "bool tensor"),
    (dict(threshold=float("nan")), "finite"),
])
def test_invalid_arguments_raise_a_sentence(bad, match):
    args = dict(x0=torch.zeros(2, 3, dtype=torch.long), conf=torch.zeros(2, 3),
                block=torch.zeros(2, 3, dtype=torch.long), is_mask=torch.zeros(2, 3, dtype=torch.bool),
                threshold=0.5) | bad
    tensors = [args.pop(name) for name in ("x0", "conf", "block", "is_mask")]
    for fn in (select_unmask_ref, select_unmask):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(*tensors, **args)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_large_batch_on_gpu(policy):
    x0, conf, block, is_mask, k, active = _problem(256, 32, torch.bfloat16, seed=5)
    expected = _run(select_unmask_ref, "cpu", x0, conf, block, is_mask, policy, k, active)
    _assert_same(_run(select_unmask, "cuda", x0, conf, block, is_mask, policy, k, active), expected)
