"""torch.ops.nemotron_fast.select_unmask: registered on CPU (the reference), CUDA, and Meta/FakeTensor."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from nemotron_fast import _ops
from nemotron_fast.kernels.unmask import select_unmask_ref

QUALNAME = "nemotron_fast::select_unmask"
POLICIES = [None, 0.0, 0.5, 0.9, 1.0, "force_all"]


def _problem(batch: int = 3, length: int = 9, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 1000, (batch, length), generator=g)
    conf = (torch.randint(1, 9, (batch, length), generator=g) / 8).to(dtype)
    block = torch.randint(0, 1000, (batch, length), generator=g)
    is_mask = torch.rand(batch, length, generator=g) < 0.7
    k = torch.randint(0, length + 2, (batch,), generator=g)
    active = torch.tensor([True, False, True])[:batch]
    return x0, conf, block, is_mask, k, active


def _kwargs(policy):
    return dict(threshold=None if policy in (None, "force_all") else policy, force_all=policy == "force_all")


def test_schema_marks_the_in_place_arguments():
    schema = torch.ops.nemotron_fast.select_unmask.default._schema
    assert str(schema) == f"nemotron_fast::{_ops.SELECT_UNMASK_SCHEMA}"
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["block", "is_mask"]


def test_kernels_are_registered_for_cpu_cuda_and_meta():
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(QUALNAME, key), key


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_cpu_op_is_the_reference(policy):
    x0, conf, block, is_mask, k, active = _problem()
    b_ref, m_ref = block.clone(), is_mask.clone()
    expected = select_unmask_ref(x0, conf, b_ref, m_ref, k=k, active=active, **_kwargs(policy))
    b_op, m_op = block.clone(), is_mask.clone()
    revealed = torch.ops.nemotron_fast.select_unmask(x0, conf, b_op, m_op, k, active, **_kwargs(policy))
    assert torch.equal(revealed, expected) and torch.equal(b_op, b_ref) and torch.equal(m_op, m_ref)
    b_kw, m_kw = block.clone(), is_mask.clone()
    assert torch.equal(_ops.select_unmask(x0, conf, b_kw, m_kw, k=k, active=active, **_kwargs(policy)), expected)
    assert torch.equal(b_kw, b_ref) and torch.equal(m_kw, m_ref)


def test_fake_and_meta_tensors_get_a_bool_mask():
    with FakeTensorMode():
        x0 = torch.empty(4, 32, dtype=torch.long)
        out = torch.ops.nemotron_fast.select_unmask(x0, torch.empty(4, 32, dtype=torch.bfloat16), x0.clone(),
                                                    torch.empty(4, 32, dtype=torch.bool), None, None, 0.9)
        assert out.shape == (4, 32) and out.dtype == torch.bool
    meta = torch.empty(2, 7, dtype=torch.long, device="meta")
    out = torch.ops.nemotron_fast.select_unmask(meta, torch.empty(2, 7, device="meta"), meta.clone(),
                                                torch.empty(2, 7, dtype=torch.bool, device="meta"),
                                                torch.empty(2, dtype=torch.long, device="meta"), None, None)
    assert out.device.type == "meta" and out.shape == (2, 7) and out.dtype == torch.bool


def test_fake_impl_checks_shapes():
    with FakeTensorMode(), pytest.raises(RuntimeError, match="must match"):
        x0 = torch.empty(4, 32, dtype=torch.long)
        torch.ops.nemotron_fast.select_unmask(x0, torch.empty(4, 31), x0.clone(),
                                              torch.empty(4, 32, dtype=torch.bool), None, None, 0.9)


@pytest.mark.parametrize("policy", [None, 0.9])
def test_opcheck(policy):
    x0, conf, block, is_mask, k, active = _problem(seed=1)
    kw = _kwargs(policy)
    results = torch.library.opcheck(torch.ops.nemotron_fast.select_unmask.default,
                                    (x0, conf, block, is_mask, k, active, kw["threshold"], kw["force_all"]))
    assert results and all(v == "SUCCESS" for v in results.values()), results


def test_traces_under_torch_compile():
    def step(x0, conf, block, is_mask, k, active):
        return _ops.select_unmask(x0, conf, block, is_mask, threshold=0.5, k=k, active=active)

    x0, conf, block, is_mask, k, active = _problem(seed=2)
    b_eager, m_eager = block.clone(), is_mask.clone()
    expected = step(x0, conf, b_eager, m_eager, k, active)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    revealed = compiled(x0, conf, block, is_mask, k, active)
    assert torch.equal(revealed, expected) and torch.equal(block, b_eager) and torch.equal(is_mask, m_eager)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_cuda_op_matches_the_reference(policy):
    # The CUDA kernel of nemotron_fast._C when it was built, else the torch twin (with a warning).
    x0, conf, block, is_mask, k, active = _problem(batch=3, length=40, seed=3)
    b_ref, m_ref = block.clone(), is_mask.clone()
    expected = select_unmask_ref(x0, conf, b_ref, m_ref, k=k, active=active, **_kwargs(policy))
    b_gpu, m_gpu = block.cuda(), is_mask.cuda()
    # conf as a strided view, as the sampler may pass it.
    conf_gpu = conf.t().contiguous().cuda().t()
    revealed = _ops.select_unmask(x0.cuda(), conf_gpu, b_gpu, m_gpu, k=k.cuda(), active=active.cuda(),
                                  **_kwargs(policy))
    assert torch.equal(revealed.cpu(), expected)
    assert torch.equal(b_gpu.cpu(), b_ref) and torch.equal(m_gpu.cpu(), m_ref)
