"""Tier 2: the transformers twin on tiny checkpoints, and ``reference.generate`` driving it.

The twin is the ground truth for the fast model, so these tests pin what it must do: load strictly, keep the
cache untouched in diffusion mode, attend bidirectionally within the block, continue positions across calls.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemotron_fast import reference
from nemotron_fast.errors import CheckpointError
from nemotron_fast.hf_twin import TwinModel, load_twin, read_safetensors
from nemotron_fast.sampling import even_schedule

from .helpers import vlm_prompt

FP32_ATOL = 1e-5


def image_prompt(cfg, sizes: list[tuple[int, int]], text: int = 4, seed: int = 0):
    """``input_ids`` [1, P] with the marker layout for each ``(H, W)`` image, ``pixel_values`` and ``image_sizes``."""
    unit = cfg.vision.patch_size * cfg.spatial_merge_size
    return vlm_prompt(cfg, seed, n_text=3, grids=tuple((h // unit, w // unit) for h, w in sizes), n_pre=text)


def text_prompt(cfg, length: int = 9, rows: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(200, cfg.vocab_size, (rows, length), generator=g)


@pytest.fixture(scope="module")
def vlm_twin(vlm_ckpt) -> TwinModel:
    return load_twin(vlm_ckpt)


@pytest.fixture(scope="module")
def text_twin(text_ckpt) -> TwinModel:
    return load_twin(text_ckpt)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vlm", [False, True])
def test_single_and_sharded_checkpoints_load_to_the_same_model(ckpt_factory, vlm):
    single = ckpt_factory(vlm=vlm, seed=3)
    sharded = ckpt_factory(vlm=vlm, seed=3, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_twin(single), load_twin(sharded)
    assert set(a.state_dict()) == set(read_safetensors(single))
    ids = text_prompt(a.config)
    logits_a = a.causal_forward(a.embed(ids), a.new_cache())
    logits_b = b.causal_forward(b.embed(ids), b.new_cache())
    assert torch.equal(logits_a, logits_b)
    assert logits_a.shape == (1, ids.shape[1], a.config.vocab_size)


def test_bf16_twin_keeps_rope_buffers_in_fp32(ckpt_factory):
    twin = load_twin(ckpt_factory(vlm=True, seed=0), dtype="bfloat16")
    assert twin.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in twin.parameters())
    assert twin.encoder.rotary_emb.inv_freq.dtype == torch.float32
    logits = twin.causal_forward(twin.embed(text_prompt(twin.config)), twin.new_cache())
    assert logits.dtype == torch.bfloat16


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("edit, names", [
    (lambda t: t.pop("encoder.norm.weight"), ["missing tensors", "encoder.norm.weight"]),
    (lambda t: t.update({"encoder.extra.weight": torch.zeros(2)}), ["unexpected tensors", "encoder.extra.weight"]),
    (lambda t: t.update({"diffusion_head.weight": torch.zeros(3, 64)}),
     ["mis-shaped tensors", "diffusion_head.weight", "(3, 64)"]),
    (lambda t: t.pop("encoder.vision_tower.transformer.layers.1.attention.k_proj.weight"),
     ["encoder.vision_tower.transformer.layers.1.attention.k_proj.weight"]),
])
def test_bad_checkpoints_are_rejected_naming_the_tensor(vlm_ckpt, tmp_path, edit, names):
    path = _broken_copy(vlm_ckpt, tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError) as info:
        load_twin(path)
    for name in names:
        assert name in str(info.value)


def test_sharded_index_naming_a_missing_shard_is_rejected(ckpt_factory, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt_factory(vlm=False, seed=3, shards=3), path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_twin(path)


# ---------------------------------------------------------------------------------------------------------------
# Forward semantics
# ---------------------------------------------------------------------------------------------------------------

def _snapshot(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_diffusion_forward_leaves_the_cache_unchanged(text_twin):
    twin = text_twin
    ids = text_prompt(twin.config, 11)
    cache = twin.new_cache()
    twin.causal_forward(twin.embed(ids), cache)
    before = _snapshot(cache)
    block = text_prompt(twin.config, 8, seed=5)
    first = twin.diffusion_forward(twin.embed(block), cache)
    assert cache.get_seq_length() == ids.shape[1]
    for (k0, v0), (k1, v1) in zip(before, _snapshot(cache)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    # Repeating the step gives the same logits, and the commit afterwards matches a cache that never saw it.
    assert torch.equal(first, twin.diffusion_forward(twin.embed(block), cache))
    fresh = twin.new_cache()
    twin.causal_forward(twin.embed(ids), fresh)
    assert torch.equal(twin.causal_forward(twin.embed(block), cache), twin.causal_forward(twin.embed(block), fresh))


def test_diffusion_block_attends_to_prefix_and_whole_block(text_twin):
    twin = text_twin
    ids, block = text_prompt(twin.config, 10), text_prompt(twin.config, 6, seed=9)
    cache = twin.new_cache()
    twin.causal_forward(twin.embed(ids), cache)
    got = twin.diffusion_forward(twin.embed(block), cache)
    # One uncached pass over prompt + block: causal rows for the prompt, full rows for the block.
    p, n = ids.shape[1], ids.shape[1] + block.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[p:, :] = True
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = twin.encoder(inputs_embeds=twin.embed(torch.cat([ids, block], 1)), attention_mask=mask,
                       position_ids=torch.arange(n).unsqueeze(0), use_cache=False)
    want = twin.diffusion_head(out.last_hidden_state)[:, p:]
    assert (got - want).abs().max().item() <= FP32_ATOL
    # Bidirectional: changing the last block token moves the first position's logits.
    other = block.clone()
    other[0, -1] = (other[0, -1] + 1) % twin.config.vocab_size
    assert not torch.allclose(got[0, 0], twin.diffusion_forward(twin.embed(other), cache)[0, 0])


def test_causal_forward_continues_positions_across_calls(text_twin):
    twin = text_twin
    ids = text_prompt(twin.config, 13)
    whole = twin.causal_forward(twin.embed(ids), twin.new_cache())
    cache = twin.new_cache()
    parts = [twin.causal_forward(twin.embed(ids[:, a:b]), cache) for a, b in ((0, 5), (5, 6), (6, 13))]
    assert (torch.cat(parts, 1) - whole).abs().max().item() <= FP32_ATOL
    assert cache.get_seq_length() == 13


def test_eager_and_sdpa_agree(text_ckpt):
    eager, sdpa = load_twin(text_ckpt), load_twin(text_ckpt, attn_implementation="sdpa")
    ids, block = text_prompt(eager.config, 7), text_prompt(eager.config, 8, seed=2)
    out = []
    for twin in (eager, sdpa):
        cache = twin.new_cache()
        out.append((twin.causal_forward(twin.embed(ids), cache), twin.diffusion_forward(twin.embed(block), cache)))
    for a, b in zip(*out):
        assert (a - b).abs().max().item() <= FP32_ATOL
    with pytest.raises(ValueError, match="attn_implementation"):
        load_twin(text_ckpt, attn_implementation="flash")


def test_embed_scatters_image_features_in_order(vlm_twin):
    twin, cfg = vlm_twin, vlm_twin.config
    ids, pix, sizes = image_prompt(cfg, [(56, 84), (28, 56)])
    emb = twin.embed(ids, pix, sizes)
    plain = twin.embed(ids)
    is_img = ids[0] == cfg.image_pad_token_id
    assert torch.equal(emb[0, ~is_img], plain[0, ~is_img])
    feats = twin.image_features(pix, sizes)
    assert feats.shape == (int(is_img.sum()), cfg.text.hidden_size)
    assert torch.equal(emb[0, is_img], feats)


def test_embed_rejects_mismatched_image_token_counts(vlm_twin, text_twin):
    ids, pix, sizes = image_prompt(vlm_twin.config, [(56, 56)])
    with pytest.raises(ValueError, match="3 image tokens .* 4 features"):
        vlm_twin.embed(_drop_one_image_token(ids, vlm_twin.config), pix, sizes)
    with pytest.raises(ValueError, match="text-only"):
        text_twin.image_features(pix, sizes)


def _drop_one_image_token(ids: torch.Tensor, cfg) -> torch.Tensor:
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[int(torch.nonzero(ids[0] == cfg.image_pad_token_id)[0])] = False
    return ids[:, keep]


# ---------------------------------------------------------------------------------------------------------------
# The reference sampler on a real (tiny) model
# ---------------------------------------------------------------------------------------------------------------

def test_reference_even_schedule_nfe_and_trace(vlm_twin):
    cfg = vlm_twin.config
    ids, pix, sizes = image_prompt(cfg, [(56, 84)])
    length, spb, blocks = 8, 4, 3
    res = reference.generate(vlm_twin, ids, pix, sizes, max_new_tokens=20, steps=spb * blocks, block_length=length,
                             threshold=None, eos_token_id=[])
    # No EOS stop and no early stop (every step reveals k > 0): blocks x (spb + 1) forwards.
    assert res.nfe == blocks * (spb + 1) and res.row_nfe == [res.nfe]
    assert len(res.trace) == blocks * spb
    assert [len(t[0]) for t in res.trace] == even_schedule(length - 1, spb) * blocks
    for b in range(blocks):
        revealed = sorted(sum((t[0] for t in res.trace[b * spb:(b + 1) * spb]), []))
        assert revealed == list(range(b * length + 1, (b + 1) * length))
    assert len(res.completion_ids[0]) == 20
    assert cfg.mask_token_id not in res.completion_ids[0]
    assert set(res.timings) == {"vision", "prefill", "denoise", "select", "commit"}


def test_reference_threshold_run_is_consistent(ckpt_factory):
    # head_scale 10 makes this tiny model confident enough to mix multi-token steps, early stops and leftovers.
    twin = load_twin(ckpt_factory(vlm=False, seed=4, head_scale=10.0))
    ids = text_prompt(twin.config, 7, rows=2)
    length, spb = 8, 4
    res = reference.generate(twin, ids, max_new_tokens=24, steps=12, block_length=length, threshold=0.9)
    blocks = res.nfe - len(res.trace)
    assert 1 <= blocks <= 3 and len(res.trace) <= blocks * spb
    assert len(res.completion_ids[0]) == len(res.completion_ids[1]) <= 24
    assert any(len(t[r]) > 1 for t in res.trace for r in range(2)), "no multi-token step: the test lost its point"
    done = {}
    for step in res.trace:
        block = next(o for row in step for o in row) // length
        for r in range(2):
            before = done.get((r, block), 0)
            # A row that still has masks always reveals its most confident one; the seed slot is never revealed.
            assert len(step[r]) >= (1 if before < length - 1 else 0)
            assert all(o // length == block and o % length != 0 for o in step[r])
            done[(r, block)] = before + len(step[r])
    mask = twin.config.mask_token_id
    for r in range(2):
        left = sum(length - 1 - done.get((r, b), 0) for b in range(blocks))
        assert res.completion_ids[r].count(mask) == left


def test_batch_rows_match_single_rows_without_eos(text_twin):
    ids = text_prompt(text_twin.config, 6, rows=2, seed=3)
    kw = dict(max_new_tokens=16, block_length=8, threshold=None, eos_token_id=[])
    both = reference.generate(text_twin, ids, **kw)
    for r in range(2):
        alone = reference.generate(text_twin, ids[r:r + 1], **kw)
        assert both.completion_ids[r] == alone.completion_ids[0]
        assert [t[r] for t in both.trace] == [t[0] for t in alone.trace]


def test_generate_builds_and_caches_the_twin_for_a_model_object(text_ckpt, text_twin):
    ids = text_prompt(text_twin.config, 5)
    ours = SimpleNamespace(checkpoint_path=str(text_ckpt), device=torch.device("cpu"), dtype=torch.float32)
    kw = dict(max_new_tokens=8, block_length=8, threshold=0.9, temperature=0.8, seed=1)
    res = reference.generate(ours, ids, **kw)
    assert isinstance(ours._nf_twin, TwinModel)
    cached = ours._nf_twin
    again = reference.generate(ours, ids, **kw)
    assert ours._nf_twin is cached
    direct = reference.generate(text_twin, ids, **kw)
    assert res.completion_ids == again.completion_ids == direct.completion_ids
    with pytest.raises(TypeError, match="checkpoint_path"):
        reference.generate(object(), ids, max_new_tokens=8)


def test_the_cached_twin_stays_out_of_our_models_weights(text_ckpt) -> None:
    from nemotron_fast.model import load

    ours = load(text_ckpt)
    keys = set(ours.state_dict())
    reference.generate(ours, text_prompt(ours.config, 5), max_new_tokens=4, block_length=4)
    assert isinstance(ours._nf_twin, TwinModel)
    assert set(ours.state_dict()) == keys
