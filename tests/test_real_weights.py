"""The real Nemotron-Labs-Diffusion-VLM-8B, for anyone who has its files (they cannot be downloaded here):

    NEMOTRON_FAST_WEIGHTS=/path/to/Nemotron-Labs-Diffusion-VLM-8B python -m pytest -q -m requires_weights -rA

Each test is one verdict on the input contract (``../shared/spec/nld-model.md``): the checkpoint's files as the
spec describes them, the spec's test image (300 x 200 -> 11 x 8 cells, 308 x 224 pixels, 97 image tokens), an
answer from both samplers in bf16 (CUDA when available, else CPU, which needs ~40 GB of memory and patience),
and, where the upstream remote code in that directory imports, our vision features, prefill logits and a
denoise step against it. Without ``NEMOTRON_FAST_WEIGHTS`` every test here is skipped.
"""

from __future__ import annotations

import json
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.requires_weights


def _root() -> Path:
    return Path(os.environ["NEMOTRON_FAST_WEIGHTS"])


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@cache
def _model() -> Any:
    from nemotron_fast.model import load

    return load(_root(), device=_device(), dtype="bfloat16")


def _spec_image() -> Image.Image:
    """The spec's 300 x 200 test image: a smooth colour field with a red disc (any content gives the same grid)."""
    yy, xx = np.mgrid[0:200, 0:300]
    arr = np.stack([xx * 255 / 299, yy * 255 / 199, np.full_like(xx, 128.0)], -1)
    arr[(xx - 150) ** 2 + (yy - 100) ** 2 < 50**2] = (220, 20, 30)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _inputs() -> Any:
    return _model().processor.build_inputs("Is there a red circle in the image? Answer yes or no.", [_spec_image()])


def test_checkpoint_files_are_as_the_spec_says() -> None:
    from nemotron_fast.config import load_config

    cfg = load_config(_root())
    raw = json.loads((_root() / "config.json").read_text())
    assert cfg.is_vlm and cfg.vocab_size == 131073 and cfg.mask_token_id == 100 and cfg.eos_token_id == 11
    assert (cfg.special.image_start, cfg.special.image_pad, cfg.special.image_break, cfg.special.image_end) == (
        18, 19, 20, 21)
    assert cfg.special.im_end == 11 and cfg.special.think is not None and cfg.special.think_end is not None
    assert not [k for k in raw if "image" in k and k.endswith("_id")], "the spec says config.json has no marker ids"
    assert cfg.image_encoder is not None and cfg.image_encoder.cell == 28 and cfg.image_encoder.max_image_size == 1400


def test_spec_test_image_gives_97_prompt_image_tokens() -> None:
    inp = _inputs()
    assert inp.image_sizes.tolist() == [[224, 308]] and tuple(inp.pixel_values.shape) == (1, 3, 224, 308)
    ids = inp.input_ids[0].tolist()
    assert ids.index(21) + 1 - ids.index(18) == 97 and ids.count(19) == 88
    assert ids[0] == 10 and ids[-2:] == [12, 13], "ChatML with no BOS, ending <think></think>"


def test_both_samplers_answer_in_bf16() -> None:
    import nemotron_fast
    from nemotron_fast import reference

    model, inp = _model(), _inputs()
    kw = dict(max_new_tokens=64, steps=64, block_length=32, threshold=0.9)
    args = (inp.input_ids, inp.pixel_values, inp.image_sizes)
    fast = nemotron_fast.generate(model, *args, **kw)
    ref = reference.generate(model, *args, **kw)
    a, b = fast.completion_ids[0], ref.completion_ids[0]
    text = model.processor.decode(a)
    print(f"\nfast: {text!r} ({fast.nfe} NFE)\nreference: {model.processor.decode(b)!r} ({ref.nfe} NFE)")
    assert text.strip(), "the model answered nothing"
    agree = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))
    assert agree >= 0.99, f"fast and reference agree on {agree:.1%} of the tokens in bf16 (gate: 99%)"


@cache
def _upstream() -> Any:
    """The checkpoint's own remote code, or a skip saying why it did not import (it pins transformers 4.57)."""
    if not (_root() / "modeling_nemotron_labs_diffusion_vlm.py").is_file():
        pytest.skip("the checkpoint directory has no upstream remote code")
    try:
        from transformers import AutoModel

        sys.path.insert(0, str(_root()))
        return AutoModel.from_pretrained(str(_root()), trust_remote_code=True, dtype=torch.bfloat16).to(
            _device()).eval()
    except Exception as exc:  # noqa: BLE001 - any import failure of foreign code is a skip with its reason
        pytest.skip(f"the upstream remote code did not import with transformers here: {exc!r}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_vision_features_equal_upstream_in_fp32() -> None:
    # in bf16 the tower's activations reach the thousands (spec): compare both towers in fp32
    up, ours, inp = _upstream(), _model(), _inputs()
    pix, sizes = inp.pixel_values.to(_device()), inp.image_sizes.to(_device())
    with torch.no_grad():
        for m in (up.encoder.vision_tower, up.encoder.multi_modal_projector, ours.encoder.vision_tower,
                  ours.encoder.multi_modal_projector):
            m.float()
        try:
            theirs = up.get_image_features(pix, sizes)
            mine = ours.image_features(pix, sizes)
        finally:
            for m in (up.encoder.vision_tower, up.encoder.multi_modal_projector, ours.encoder.vision_tower,
                      ours.encoder.multi_modal_projector):
                m.to(torch.bfloat16)
    assert mine.shape == theirs.shape == (88, ours.config.text.hidden_size)
    assert _rel(mine, theirs) <= 1e-4


def test_prefill_and_denoise_logits_agree_with_upstream() -> None:
    up, ours, inp = _upstream(), _model(), _inputs()
    dev = _device()
    ids, pix, sizes = inp.input_ids.to(dev), inp.pixel_values.to(dev, torch.bfloat16), inp.image_sizes.to(dev)
    with torch.no_grad():
        emb_up = up._embed_with_vision(ids, pix, sizes)
        emb = ours.embed(ids, pix, sizes)
        out = up.encoder(inputs_embeds=emb_up, use_cache=True, use_causal_mask=True)
        logits_up = up.diffusion_head(out.last_hidden_state)
        cache_ = ours.new_cache(1, ids.shape[1] + 32)
        logits = ours.head(ours.forward_hidden(emb, cache=cache_, start=0))
    # both in bf16: the same op order is not guaranteed, so the verdict is on the decisions and the overall error
    assert _rel(emb, emb_up) <= 2e-2
    assert _rel(logits, logits_up) <= 5e-2
    top_ours, top_up = logits[0].argmax(-1), logits_up[0].argmax(-1)
    assert float((top_ours == top_up).float().mean()) >= 0.95
    assert int(top_ours[-1]) == int(top_up[-1]), "the first answer token (AR seed) differs"
