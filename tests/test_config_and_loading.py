"""Config parsing errors name the field; the loader names missing, unexpected and mis-shaped tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nemotron_fast.config import load_config
from nemotron_fast.errors import CheckpointError, ConfigError
from nemotron_fast.model import load


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_reads_every_fact_from_the_files(vlm_ckpt: Path, text_ckpt: Path) -> None:
    cfg = load_config(vlm_ckpt)
    raw = json.loads((vlm_ckpt / "config.json").read_text())
    assert cfg.is_vlm and cfg.mask_token_id == raw["mask_token_id"] and cfg.eos_token_id == raw["eos_token_id"]
    assert cfg.text.vocab_size == raw["vocab_size"]
    # the image markers come from the tokenizer by name, as config.json holds none
    added = {t["content"]: t["id"] for t in json.loads((vlm_ckpt / "tokenizer.json").read_text())["added_tokens"]}
    assert cfg.image_pad_token_id == added["<|image_pad|>"] and cfg.special.image_end == added["<|image_end|>"]
    assert cfg.text.rope.rope_type == "yarn" and cfg.text.rope.llama_4_scaling_beta == 0.1
    assert cfg.image_encoder is not None and cfg.image_encoder.patch_size == cfg.vision.patch_size
    assert cfg.image_encoder.cell == 28 and cfg.image_encoder.max_image_size == 1400
    tcfg = load_config(text_ckpt)
    assert not tcfg.is_vlm and tcfg.vision is None


@pytest.mark.parametrize("changes,field", [
    ({"hidden_size": None}, "hidden_size"),
    ({"mask_token_id": None}, "mask_token_id"),
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"mask_token_id": 10**9}, "mask_token_id"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0}},
     "rope_parameters.original_max_position_embeddings"),
    ({"vision_config": None}, "vision_config"),
    ({"block_size": 0}, "block_size"),
    ({"hidden_act": "relu"}, "hidden_act"),
])
def test_bad_config_names_the_field(vlm_ckpt: Path, tmp_path: Path, changes: dict, field: str) -> None:
    path = _copy(vlm_ckpt, tmp_path / "c")
    _edit_config(path, **changes)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.field == field
    assert field.split(".")[-1] in str(ei.value)


def test_inconsistent_files(vlm_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(vlm_ckpt, tmp_path / "c")
    (path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "max_image_size": 700}))
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"max_image_size": 700}))
    assert load_config(path).image_encoder.max_image_size == 700
    # without tokenizer files nothing names the image pad: a VLM cannot load
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).unlink()
    with pytest.raises(ConfigError, match=r"<\|image_pad\|>"):
        load_config(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nowhere")


def _rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(str(path / "model.safetensors"))
    edit(w)
    save_file(w, str(path / "model.safetensors"))


def test_loader_names_bad_tensors(vlm_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(vlm_ckpt, tmp_path / "c")
    _rewrite_weights(path, lambda w: (w.pop("encoder.layers.1.mlp.up_proj.weight"),
                                      w.__setitem__("encoder.extra.weight", torch.zeros(2)),
                                      w.__setitem__("diffusion_head.weight", torch.zeros(3, 3))))
    with pytest.raises(CheckpointError) as ei:
        load(path)
    msg = str(ei.value)
    assert "missing tensors: encoder.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors: encoder.extra.weight" in msg
    assert "diffusion_head.weight (checkpoint (3, 3)" in msg
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(path)


def test_sharded_equals_single(ckpt_factory) -> None:
    a = load(ckpt_factory(vlm=True, seed=3))
    b = load(ckpt_factory(vlm=True, seed=3, shards=3))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert list(Path(b.checkpoint_path).glob("model-0000*-of-00003.safetensors"))


def test_dtype_and_device(vlm_ckpt: Path) -> None:
    m = load(vlm_ckpt, dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    assert m.rotary.inv_freq.dtype == torch.float32 and m.rotary.inv_freq.device.type == "cpu"
    with pytest.raises(ValueError, match="unsupported dtype"):
        load(vlm_ckpt, dtype="int8")
