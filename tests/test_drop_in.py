"""patch()/unpatch() on a stand-in for the upstream object (the remote code cannot be downloaded).

The stand-in has the real object's surface as Axolotl's NLD integration and jevons-rs' reference dump use it:
the module layout ``encoder.{embed_tokens, layers, norm, vision_tower, multi_modal_projector}`` +
``diffusion_head`` (transformers' Ministral3/Pixtral/Mistral3 modules), a transformers-style ``config`` whose
``to_dict()`` is config.json (no image-marker ids in it), the class constant ``IMAGE_TOKEN_ID``, and the methods
``get_image_features(pixel_values, image_sizes)``, ``_embed_with_vision(input_ids, pixel_values, image_sizes)``
(features into the ``IMAGE_TOKEN_ID`` slots only) and ``generate(prompt_ids, pixel_values=, image_sizes=,
max_new_tokens=, steps=, block_length=, shift_logits=False, threshold=, eos_token_id=)`` running the upstream
algorithm (our reference), and upstream's other two modes ``ar_generate(prompt_ids, max_new_tokens=128,
temperature=0.0, eos_token_id=None, ...)`` and ``linear_spec_generate(prompt_ids, max_new_tokens=128,
block_length=32, temperature=0.0, mask_token_id=None, eos_token_id=None, ..., threshold=0.0)`` (our reference
modes, with the checkpoint's ``linear_spec_lora/`` adapter on during drafts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import nemotron_fast
from nemotron_fast import reference
from nemotron_fast.errors import ConfigError
from nemotron_fast.hf_twin import load_twin
from nemotron_fast.processing import Processor

from .helpers import text_prompt, vlm_prompt


class _Config:
    """What a transformers ``PretrainedConfig`` offers patch(): ``to_dict()`` of config.json."""

    def __init__(self, raw: dict) -> None:
        self._raw = raw

    def to_dict(self) -> dict:
        return dict(self._raw)


class UpstreamStandIn(torch.nn.Module):
    """The upstream model object (see the module docstring)."""

    IMAGE_TOKEN_ID = 19  # upstream's class constant (image_processing.IMG_PAD_ID)

    def __init__(self, path: Path) -> None:
        super().__init__()
        twin = load_twin(path)
        self.encoder = twin.encoder
        self.diffusion_head = twin.diffusion_head
        self.config = _Config(json.loads((path / "config.json").read_text()))
        self.name_or_path = str(path)
        object.__setattr__(self, "_twin", twin)  # runs the upstream algorithm; not a submodule

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        return self._twin.image_features(pixel_values, image_sizes)

    def _embed_with_vision(self, input_ids, pixel_values, image_sizes) -> torch.Tensor:
        embeds = self.encoder.embed_tokens(input_ids)
        feats = self.get_image_features(pixel_values, image_sizes)
        slots = input_ids == self.IMAGE_TOKEN_ID
        assert int(slots.sum()) == feats.shape[0]
        return embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), feats.to(embeds.dtype))

    def generate(self, prompt_ids, pixel_values=None, image_sizes=None, max_new_tokens=128, steps=None,
                 block_length=32, shift_logits=False, threshold=None, eos_token_id=None, **_):
        r = reference.generate(self._twin, prompt_ids, pixel_values, image_sizes, max_new_tokens=max_new_tokens,
                               steps=steps, block_length=block_length, threshold=threshold,
                               eos_token_id=eos_token_id)
        return torch.cat([prompt_ids, torch.tensor(r.completion_ids)], 1), r.nfe

    def ar_generate(self, prompt_ids, max_new_tokens=128, temperature=0.0, eos_token_id=None,
                    max_thinking_tokens=None, end_think_token_id=None):
        r = reference.generate(self._twin, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               eos_token_id=eos_token_id, mode="ar")
        return torch.cat([prompt_ids, torch.tensor(r.completion_ids)], 1), r.nfe

    def linear_spec_generate(self, prompt_ids, max_new_tokens=128, block_length=32, temperature=0.0,
                             mask_token_id=None, eos_token_id=None, max_thinking_tokens=None,
                             end_think_token_id=None, threshold=0.0):
        if prompt_ids.shape[0] != 1:
            raise ValueError("Linear speculative decoding requires batch_size == 1")
        r = reference.generate(self._twin, prompt_ids, max_new_tokens=max_new_tokens, block_length=block_length,
                               temperature=temperature, eos_token_id=eos_token_id, threshold=threshold,
                               mask_token_id=mask_token_id, mode="linear_spec")
        return torch.cat([prompt_ids, torch.tensor(r.completion_ids)], 1), r.nfe


def _standin(path) -> UpstreamStandIn:
    return UpstreamStandIn(Path(path))


@pytest.mark.parametrize("vlm", [True, False])
def test_patch_equals_upstream_and_unpatch_restores(ckpt_factory, vlm: bool) -> None:
    model = _standin(ckpt_factory(vlm=vlm, seed=21, head_scale=8.0))
    cfg = model._twin.config
    if vlm:
        ids, pix, sizes = vlm_prompt(cfg, 3)
        call = dict(pixel_values=pix, image_sizes=sizes, max_new_tokens=40, steps=8, block_length=20,
                    threshold=0.9, shift_logits=False, eos_token_id=cfg.eos_token_id)
        upstream = model.generate(ids, **call)
    else:
        ids = text_prompt(cfg, 4, 13)
        upstream = model.generate(ids, max_new_tokens=40, block_length=20, threshold=None)
    original = model.generate
    nemotron_fast.patch(model)
    assert nemotron_fast.drop_in.is_patched(model)
    if vlm:
        fast = model.generate(ids, **call)
    else:
        # the text LM's call shape: positional (prompt_ids, max_new_tokens, block_length), no steps
        fast = model.generate(ids, 40, 20, threshold=None, causal_context=True, temperature=0.0, eos_token_id=None)
    assert torch.equal(fast[0], upstream[0]) and fast[1] == upstream[1]
    shadow = vars(model)["_nemotron_fast"]["model"]
    # the weights are the upstream object's own tensors, not copies
    assert shadow.diffusion_head.weight.data_ptr() == model.diffusion_head.weight.data_ptr()
    assert shadow.encoder.layers[0].mlp.up_proj.weight.data_ptr() == \
        model.encoder.layers[0].mlp.up_proj.weight.data_ptr()
    nemotron_fast.unpatch(model)
    assert not nemotron_fast.drop_in.is_patched(model)
    assert model.generate == original
    assert type(model).generate is UpstreamStandIn.generate


def test_patch_takes_ids_built_by_upstream_processing(ckpt_factory) -> None:
    path = Path(ckpt_factory(vlm=True, seed=5, head_scale=8.0))
    model = _standin(path)
    proc = Processor.from_pretrained(path, load_twin(path).config)
    imgs = [Image.new("RGB", (60, 30), (200, 30, 30)), Image.new("RGB", (28, 56), (0, 90, 250))]
    inp = proc.build_inputs("What colours?", imgs)
    ids = inp.input_ids
    assert ids[0].tolist().count(model.IMAGE_TOKEN_ID) == 3 * 2 + 1 * 2  # pads: 3x2 and 1x2 cells (w x h)
    # the upstream embedding puts features at the pads only; the markers keep their token embeddings
    emb = model._embed_with_vision(ids, inp.pixel_values, inp.image_sizes)
    plain = model.encoder.embed_tokens(ids)
    pads = ids[0] == model.IMAGE_TOKEN_ID
    assert torch.equal(emb[0, ~pads], plain[0, ~pads]) and not torch.equal(emb[0, pads], plain[0, pads])
    call = dict(pixel_values=inp.pixel_values, image_sizes=inp.image_sizes, max_new_tokens=40, steps=8,
                block_length=20, shift_logits=False, threshold=0.9, eos_token_id=11)
    upstream = model.generate(ids, **call)
    nemotron_fast.patch(model)
    fast = model.generate(prompt_ids=ids, **call)
    assert torch.equal(fast[0], upstream[0]) and fast[1] == upstream[1]
    shadow = vars(model)["_nemotron_fast"]["model"]
    assert shadow.config.image_pad_token_id == 19
    torch.testing.assert_close(shadow.embed(ids, inp.pixel_values, inp.image_sizes), emb, rtol=0, atol=1e-5)


def test_patch_finds_the_image_pad_id(ckpt_factory, tmp_path: Path) -> None:
    path = Path(ckpt_factory(vlm=True, seed=5))
    model = _standin(path)
    model.name_or_path = str(tmp_path / "not-a-checkpoint")
    nemotron_fast.patch(model)  # the class constant serves
    assert vars(model)["_nemotron_fast"]["model"].config.image_pad_token_id == 19
    nemotron_fast.unpatch(model)
    type(model).IMAGE_TOKEN_ID = None
    try:
        with pytest.raises(ConfigError, match=r"<\|image_pad\|>"):
            nemotron_fast.patch(model)
        tok = Processor.from_pretrained(path, load_twin(path).config).tokenizer
        nemotron_fast.patch(model, tokenizer=tok)  # ... or the tokenizer, by name
        assert vars(model)["_nemotron_fast"]["model"].config.image_pad_token_id == 19
    finally:
        type(model).IMAGE_TOKEN_ID = 19


def test_patch_rejects_unsupported_options(ckpt_factory) -> None:
    model = _standin(ckpt_factory(vlm=False, seed=21))
    nemotron_fast.patch(model)
    ids = text_prompt(model._twin.config, 4, 9)
    with pytest.raises(NotImplementedError, match="shift_logits"):
        model.generate(ids, max_new_tokens=8, block_length=4, shift_logits=True)
    with pytest.raises(TypeError, match="unexpected"):
        model.generate(ids, max_new_tokens=8, block_length=4, bogus=1)
    with pytest.raises(TypeError, match="upstream module layout"):
        nemotron_fast.patch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("lora", [True, False])
def test_patch_replaces_ar_and_linear_spec(ckpt_factory, lora: bool) -> None:
    model = _standin(ckpt_factory(vlm=False, seed=21, head_scale=8.0, draft_lora_rank=4 if lora else 0))
    cfg = model._twin.config
    ids = text_prompt(cfg, 4, 11)
    free = model.ar_generate(ids, 12)
    eos = int(free[0][0, ids.shape[1] + 4])
    upstream_ar = model.ar_generate(ids, max_new_tokens=12, eos_token_id=eos)
    upstream_spec = model.linear_spec_generate(ids, max_new_tokens=13, block_length=5, threshold=0.5)
    upstream_spec0 = model.linear_spec_generate(ids, 13, 6)
    originals = (model.ar_generate, model.linear_spec_generate)
    nemotron_fast.patch(model)
    shadow = vars(model)["_nemotron_fast"]["model"]
    assert (shadow.draft_lora is not None) == lora
    fast_ar = model.ar_generate(ids, max_new_tokens=12, eos_token_id=eos)
    fast_spec = model.linear_spec_generate(ids, max_new_tokens=13, block_length=5, threshold=0.5)
    fast_spec0 = model.linear_spec_generate(ids, 13, 6)
    for fast, upstream in ((fast_ar, upstream_ar), (fast_spec, upstream_spec), (fast_spec0, upstream_spec0)):
        assert torch.equal(fast[0], upstream[0]) and fast[1] == upstream[1]
    with pytest.raises(ValueError, match="batch_size == 1"):
        model.linear_spec_generate(ids.expand(2, -1), 8)
    with pytest.raises(NotImplementedError, match="thinking"):
        model.ar_generate(ids, 8, max_thinking_tokens=4, end_think_token_id=5)
    nemotron_fast.unpatch(model)
    assert (model.ar_generate, model.linear_spec_generate) == originals
    assert "ar_generate" not in vars(model) and "linear_spec_generate" not in vars(model)


class _PeftLoraLinear(torch.nn.Module):
    """What PEFT's ``lora.Linear`` looks like to patch(): ``base_layer`` + ``lora_A``/``lora_B`` ModuleDicts keyed
    by adapter name + a ``scaling`` dict (state-dict keys ``<proj>.base_layer.weight``, ``<proj>.lora_A.default
    .weight``). Its forward is the base layer's: the stand-in's reference adds the delta itself during drafts."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(a.shape[1], a.shape[0], bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(b.shape[1], b.shape[0], bias=False)})
        self.lora_A["default"].weight.data = a.clone()
        self.lora_B["default"].weight.data = b.clone()
        self.scaling = {"default": scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


def test_patch_reads_a_peft_attached_draft_adapter(ckpt_factory, tmp_path: Path) -> None:
    model = _standin(ckpt_factory(vlm=False, seed=21, head_scale=8.0, draft_lora_rank=4))
    lora = model._twin.draft_lora
    for (i, proj), (a, b) in lora.weights.items():
        attn = model.encoder.layers[i].self_attn
        setattr(attn, proj, _PeftLoraLinear(getattr(attn, proj), a, b, lora.scale))
    model.name_or_path = str(tmp_path)  # no linear_spec_lora/ folder there: the attached layers must serve
    ids = text_prompt(model._twin.config, 5, 9)
    upstream = model.linear_spec_generate(ids, max_new_tokens=12, block_length=6, threshold=0.5)
    nemotron_fast.patch(model)
    shadow = vars(model)["_nemotron_fast"]["model"]
    assert shadow.draft_lora is not None and shadow.draft_lora.scale == lora.scale
    assert set(shadow.draft_lora.weights) == set(lora.weights)
    assert shadow.encoder.layers[0].self_attn.o_proj.weight.data_ptr() == \
        model.encoder.layers[0].self_attn.o_proj.base_layer.weight.data_ptr()
    fast = model.linear_spec_generate(ids, max_new_tokens=12, block_length=6, threshold=0.5)
    assert torch.equal(fast[0], upstream[0]) and fast[1] == upstream[1]
