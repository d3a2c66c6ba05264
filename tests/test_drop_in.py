"""patch()/unpatch() on a stand-in with the upstream module layout (the remote code cannot be downloaded):
transformers' Ministral3/Pixtral/Mistral3 modules under ``encoder``, an untied ``diffusion_head``, and a
``generate`` that runs the upstream algorithm (our reference)."""

from __future__ import annotations

import pytest
import torch

import nemotron_fast
from nemotron_fast import reference
from nemotron_fast.hf_twin import TwinModel, load_twin

from .helpers import text_prompt, vlm_prompt


class UpstreamStandIn(TwinModel):
    """The upstream object: its own generate returns (prompt + completion, nfe)."""

    def generate(self, input_ids=None, pixel_values=None, image_sizes=None, *, max_new_tokens, steps=None,
                 block_length=32, threshold=None, eos_token_id=None, shift_logits=False, **_):
        r = reference.generate(self, input_ids, pixel_values, image_sizes, max_new_tokens=max_new_tokens,
                               steps=steps, block_length=block_length, threshold=threshold,
                               eos_token_id=eos_token_id)
        return torch.cat([input_ids, torch.tensor(r.completion_ids)], 1), r.nfe


def _standin(path) -> UpstreamStandIn:
    twin = load_twin(path)
    twin.__class__ = UpstreamStandIn
    return twin


@pytest.mark.parametrize("vlm", [True, False])
def test_patch_equals_upstream_and_unpatch_restores(ckpt_factory, vlm: bool) -> None:
    model = _standin(ckpt_factory(vlm=vlm, seed=21, head_scale=8.0))
    cfg = model.config
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


def test_patch_rejects_unsupported_options(ckpt_factory) -> None:
    model = _standin(ckpt_factory(vlm=False, seed=21))
    nemotron_fast.patch(model)
    ids = text_prompt(model.config, 4, 9)
    with pytest.raises(NotImplementedError, match="shift_logits"):
        model.generate(ids, max_new_tokens=8, block_length=4, shift_logits=True)
    with pytest.raises(TypeError, match="unexpected"):
        model.generate(ids, max_new_tokens=8, block_length=4, bogus=1)
    with pytest.raises(TypeError, match="upstream module layout"):
        nemotron_fast.patch(torch.nn.Linear(2, 2))
