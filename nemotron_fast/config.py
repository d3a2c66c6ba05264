"""Typed views of a checkpoint's ``config.json``, ``generation_config.json``, the token strings of its tokenizer
files and (optional) ``preprocessor_config.json``.

Every model fact the package uses (token ids, sizes, RoPE settings, block size) is read here and nowhere else.
A missing required field, an unknown architecture, a token the tokenizer lacks or two files that disagree raise
:class:`ConfigError` naming the field or the token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "RopeConfig",
    "TextConfig",
    "VisionConfig",
    "ImageEncoderConfig",
    "SpecialTokens",
    "NLDConfig",
    "load_config",
    "read_added_tokens",
    "TEXT_MODEL_TYPE",
    "VLM_MODEL_TYPE",
]

TEXT_MODEL_TYPE = "nemotron_labs_diffusion"
VLM_MODEL_TYPE = "nemotron_labs_diffusion_vlm"
_ARCHS = {TEXT_MODEL_TYPE: "NemotronLabsDiffusionModel", VLM_MODEL_TYPE: "NemotronLabsDiffusionVLMModel"}
# mistral-common's image encoder, which the VLM's image_processing.py ports: the default cap on the longest side
# and the CLIP statistics it normalises with.
DEFAULT_MAX_IMAGE_SIZE = 1400
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _req(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, path: str | None) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"missing required field '{where}{key}'", field=f"{where}{key}", path=path)
    return _check_type(d[key], key, kind, where, path)


def _opt(d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str, path: str | None) -> Any:
    if d.get(key) is None:
        return default
    return _check_type(d[key], key, kind, where, path)


def _check_type(value: Any, key: str, kind: type | tuple[type, ...], where: str, path: str | None) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ConfigError(f"field '{where}{key}' must be {names}, got {value!r}", field=f"{where}{key}", path=path)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and kinds != (bool,):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"field '{where}{key}' must be finite, got {value!r}", field=f"{where}{key}", path=path)
    return value


def _positive(value: int | float, name: str, path: str | None) -> None:
    if value <= 0:
        raise ConfigError(f"field '{name}' must be > 0, got {value}", field=name, path=path)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings of the text backbone (``default`` or ``yarn``) plus Llama-4 query scaling."""

    rope_type: str
    theta: float
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: dict[str, Any], path: str | None) -> RopeConfig:
        w = "rope_parameters."
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"unsupported '{w}rope_type' {rope_type!r} (supported: default, yarn)", path=path,
                              field=f"{w}rope_type")
        theta = d.get("rope_theta", root.get("rope_theta"))
        if theta is None:
            raise ConfigError(f"missing required field '{w}rope_theta'", field=f"{w}rope_theta", path=path)
        theta = float(_check_type(theta, "rope_theta", float, w, path))
        _positive(theta, f"{w}rope_theta", path)
        cfg = cls(
            rope_type=rope_type,
            theta=theta,
            factor=_opt(d, "factor", float, 1.0, w, path),
            original_max_position_embeddings=_opt(d, "original_max_position_embeddings", int, None, w, path),
            beta_fast=_opt(d, "beta_fast", float, 32.0, w, path),
            beta_slow=_opt(d, "beta_slow", float, 1.0, w, path),
            mscale=_opt(d, "mscale", float, None, w, path),
            mscale_all_dim=_opt(d, "mscale_all_dim", float, None, w, path),
            attention_factor=_opt(d, "attention_factor", float, None, w, path),
            truncate=_opt(d, "truncate", bool, True, w, path),
            llama_4_scaling_beta=_opt(d, "llama_4_scaling_beta", float, None, w, path),
        )
        if rope_type == "yarn":
            if cfg.original_max_position_embeddings is None:
                raise ConfigError(f"yarn RoPE needs '{w}original_max_position_embeddings'", path=path,
                                  field=f"{w}original_max_position_embeddings")
            _positive(cfg.factor, f"{w}factor", path)
        if cfg.llama_4_scaling_beta is not None and cfg.original_max_position_embeddings is None:
            raise ConfigError(f"'{w}llama_4_scaling_beta' needs '{w}original_max_position_embeddings'", path=path,
                              field=f"{w}original_max_position_embeddings")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "yarn":
            out.update(factor=self.factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            for k in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, k) is not None:
                    out[k] = getattr(self, k)
        if self.original_max_position_embeddings is not None:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.llama_4_scaling_beta is not None:
            out["llama_4_scaling_beta"] = self.llama_4_scaling_beta
        return out


@dataclass(frozen=True)
class TextConfig:
    """The Ministral-3 style decoder backbone."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    rope: RopeConfig

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | None) -> TextConfig:
        w = ""
        hidden = _req(d, "hidden_size", int, w, path)
        heads = _req(d, "num_attention_heads", int, w, path)
        kv = _opt(d, "num_key_value_heads", int, heads, w, path)
        head_dim = _opt(d, "head_dim", int, None, w, path)
        for name, v in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
            _positive(v, name, path)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"'hidden_size' {hidden} is not divisible by 'num_attention_heads' {heads} and "
                                  "'head_dim' is not given", field="head_dim", path=path)
            head_dim = hidden // heads
        if heads % kv:
            raise ConfigError(f"'num_attention_heads' {heads} is not a multiple of 'num_key_value_heads' {kv}",
                              field="num_key_value_heads", path=path)
        if head_dim % 2:
            raise ConfigError(f"'head_dim' must be even for RoPE, got {head_dim}", field="head_dim", path=path)
        act = _opt(d, "hidden_act", str, "silu", w, path)
        if act != "silu":
            raise ConfigError(f"unsupported 'hidden_act' {act!r} (the backbone is SwiGLU with silu)",
                              field="hidden_act", path=path)
        for flag in ("attention_bias", "mlp_bias"):
            if _opt(d, flag, bool, False, w, path):
                raise ConfigError(f"'{flag}' true is not supported (NLD has no biases)", field=flag, path=path)
        if _opt(d, "tie_word_embeddings", bool, False, w, path):
            raise ConfigError("'tie_word_embeddings' true is not supported (NLD's diffusion_head is untied)",
                              field="tie_word_embeddings", path=path)
        if _opt(d, "sliding_window", int, None, w, path) is not None:
            raise ConfigError("'sliding_window' is not supported (NLD attends to the whole prefix)",
                              field="sliding_window", path=path)
        rope_d = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope_d, dict):
            raise ConfigError("'rope_parameters' must be an object", field="rope_parameters", path=path)
        cfg = cls(
            vocab_size=_req(d, "vocab_size", int, w, path),
            hidden_size=hidden,
            intermediate_size=_req(d, "intermediate_size", int, w, path),
            num_hidden_layers=_req(d, "num_hidden_layers", int, w, path),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=_opt(d, "rms_norm_eps", float, 1e-5, w, path),
            hidden_act=act,
            max_position_embeddings=_opt(d, "max_position_embeddings", int, 262144, w, path),
            rope=RopeConfig.from_dict(rope_d, d, path),
        )
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
            _positive(getattr(cfg, name), name, path)
        _positive(cfg.rms_norm_eps, "rms_norm_eps", path)
        return cfg


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral ViT (``vision_config`` in the VLM's config.json)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    patch_size: int
    image_size: int
    num_channels: int
    rope_theta: float
    hidden_act: str

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | None) -> VisionConfig:
        w = "vision_config."
        mt = d.get("model_type", "pixtral")
        if mt != "pixtral":
            raise ConfigError(f"unsupported '{w}model_type' {mt!r} (expected 'pixtral')", field=f"{w}model_type",
                              path=path)
        hidden = _req(d, "hidden_size", int, w, path)
        heads = _req(d, "num_attention_heads", int, w, path)
        _positive(heads, f"{w}num_attention_heads", path)
        if hidden % heads:
            raise ConfigError(f"'{w}hidden_size' {hidden} is not divisible by '{w}num_attention_heads' {heads}",
                              field=f"{w}hidden_size", path=path)
        head_dim = _opt(d, "head_dim", int, hidden // heads, w, path)
        if head_dim != hidden // heads:
            raise ConfigError(f"'{w}head_dim' {head_dim} != hidden_size / num_attention_heads = {hidden // heads}",
                              field=f"{w}head_dim", path=path)
        if head_dim % 4:
            raise ConfigError(f"'{w}head_dim' must be a multiple of 4 for 2-D RoPE, got {head_dim}",
                              field=f"{w}head_dim", path=path)
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        act = _opt(d, "hidden_act", str, "silu", w, path)
        if act not in ("silu", "gelu"):
            raise ConfigError(f"unsupported '{w}hidden_act' {act!r}", field=f"{w}hidden_act", path=path)
        cfg = cls(
            hidden_size=hidden,
            intermediate_size=_req(d, "intermediate_size", int, w, path),
            num_hidden_layers=_req(d, "num_hidden_layers", int, w, path),
            num_attention_heads=heads,
            head_dim=head_dim,
            patch_size=_req(d, "patch_size", int, w, path),
            image_size=_opt(d, "image_size", int, 1540, w, path),
            num_channels=_opt(d, "num_channels", int, 3, w, path),
            rope_theta=float(_check_type(theta, "rope_theta", float, w, path)),
            hidden_act=act,
        )
        for name in ("intermediate_size", "num_hidden_layers", "patch_size", "image_size", "num_channels"):
            _positive(getattr(cfg, name), f"{w}{name}", path)
        return cfg


@dataclass(frozen=True)
class ImageEncoderConfig:
    """The VLM's image encoder (upstream ``image_processing.py``, a port of mistral-common's ``ImageEncoder``).

    The real checkpoint has no ``preprocessor_config.json``: these defaults are the contract. ``cell`` =
    ``patch_size * spatial_merge_size`` (28) is one prompt token's side in pixels. When a checkpoint does ship a
    ``preprocessor_config.json``, only its ``max_image_size`` is honoured (the default cap); its ``patch_size``,
    ``spatial_merge_size``, ``image_mean`` and ``image_std`` must equal the contract if present (upstream's
    encoder hard-codes them, so a file that disagrees describes another model: ConfigError); every other key
    (``size``, ``resample``, ``do_*``: fields of transformers' Pixtral processor) is ignored, as upstream ignores
    the file.
    """

    patch_size: int
    spatial_merge_size: int
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE

    @property
    def cell(self) -> int:
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, patch_size: int, spatial_merge_size: int,
                  path: str | None) -> ImageEncoderConfig:
        d = d or {}
        w = "preprocessor_config.json: "
        patch = d.get("patch_size", patch_size)
        if isinstance(patch, dict):
            patch = patch.get("height", patch_size)
        expected = {"patch_size": (patch, patch_size), "spatial_merge_size": (d.get("spatial_merge_size",
                    spatial_merge_size), spatial_merge_size),
                    "image_mean": (d.get("image_mean", list(CLIP_MEAN)), list(CLIP_MEAN)),
                    "image_std": (d.get("image_std", list(CLIP_STD)), list(CLIP_STD))}
        for name, (got, want) in expected.items():
            if got != want:
                raise ConfigError(f"{w}'{name}' is {got!r}, but the NLD image encoder uses {want!r}", field=name,
                                  path=path)
        cap = _opt(d, "max_image_size", int, DEFAULT_MAX_IMAGE_SIZE, "", path)
        _positive(cap, "max_image_size", path)
        return cls(patch_size=patch_size, spatial_merge_size=spatial_merge_size, max_image_size=cap)


# Marker and chat tokens, resolved by their strings in the tokenizer (a config.json field of the listed names
# wins where one exists): attribute -> (token string, config fields).
_TOKEN_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "image_start": ("<|image_start|>", ("image_start_token_id",)),
    "image_pad": ("<|image_pad|>", ("image_pad_token_id", "image_token_id", "image_token_index")),
    "image_break": ("<|image_break|>", ("image_break_token_id",)),
    "image_end": ("<|image_end|>", ("image_end_token_id",)),
    "im_start": ("<|im_start|>", ("im_start_token_id",)),
    "im_end": ("<|im_end|>", ("im_end_token_id",)),
    "think": ("<think>", ("think_token_id", "think_start_token_id")),
    "think_end": ("</think>", ("think_end_token_id",)),
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the image markers and chat tokens (None where neither the config nor the tokenizer has one).

    Vision features replace the embeddings at ``image_pad`` positions only; ``image_start``, ``image_break`` and
    ``image_end`` keep their token embeddings.
    """

    image_start: int | None = None
    image_pad: int | None = None
    image_break: int | None = None
    image_end: int | None = None
    im_start: int | None = None
    im_end: int | None = None
    think: int | None = None
    think_end: int | None = None

    @classmethod
    def resolve(cls, config: dict[str, Any], tokens: dict[str, int] | None, path: str | None) -> SpecialTokens:
        """Config fields first, then ``tokens`` (token string -> id, the tokenizer's added tokens)."""
        out: dict[str, int | None] = {}
        for attr, (text, fields) in _TOKEN_NAMES.items():
            value = next((config[f] for f in fields if config.get(f) is not None), None)
            if value is not None:
                value = _check_type(value, fields[0], int, "", path)
            elif tokens is not None:
                value = tokens.get(text)
            out[attr] = value
        return cls(**out)

    def require(self, *attrs: str, path: str | None = None) -> tuple[int, ...]:
        """The ids of ``attrs``; ConfigError naming the first token neither the tokenizer nor the config has."""
        ids = []
        for attr in attrs:
            value = getattr(self, attr)
            if value is None:
                text, fields = _TOKEN_NAMES[attr]
                raise ConfigError(f"the tokenizer has no {text!r} token and config.json has no '{fields[0]}'",
                                  field=text, path=path)
            ids.append(value)
        return tuple(ids)

    def as_dict(self) -> dict[str, int | None]:
        return {attr: getattr(self, attr) for attr in _TOKEN_NAMES}

    @staticmethod
    def token_text(attr: str) -> str:
        return _TOKEN_NAMES[attr][0]


@dataclass(frozen=True)
class NLDConfig:
    """Everything the package needs to know about one checkpoint.

    ``eos_token_ids`` holds every id that ends a completion (config.json and generation_config.json merged);
    ``eos_token_id`` is the first of them, the one the upstream ``generate`` compares against.
    """

    model_type: str
    text: TextConfig
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    block_size: int
    dtype: str | None
    vision: VisionConfig | None = None
    special: SpecialTokens = field(default_factory=SpecialTokens)
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = False
    vision_feature_layer: int = -1
    dlm_paradigm: str | None = None
    image_encoder: ImageEncoderConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def image_pad_token_id(self) -> int:
        """The id whose embeddings the vision features replace (``<|image_pad|>``); ConfigError if unknown."""
        return self.special.require("image_pad")[0]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, generation: dict[str, Any] | None = None,
                  preprocessor: dict[str, Any] | None = None, tokens: dict[str, int] | None = None,
                  path: str | None = None) -> NLDConfig:
        """Build from a ``config.json`` dict. ``tokens`` maps the tokenizer's added-token strings to ids (see
        :func:`read_added_tokens`); the image markers and chat tokens are resolved from it by name, a config
        field winning. A VLM needs at least ``<|image_pad|>``."""
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object", path=path)
        mt = d.get("model_type")
        if mt not in _ARCHS:
            raise ConfigError(f"unknown 'model_type' {mt!r} (expected one of {sorted(_ARCHS)})", field="model_type",
                              path=path)
        archs = d.get("architectures")
        if archs is not None and _ARCHS[mt] not in archs:
            raise ConfigError(f"'architectures' {archs} does not match model_type {mt!r} (expected {_ARCHS[mt]})",
                              field="architectures", path=path)
        text_d = dict(d)
        if isinstance(d.get("text_config"), dict):
            text_d.update(d["text_config"])
        text = TextConfig.from_dict(text_d, path)
        gen = generation or {}
        eos = _eos_ids(d.get("eos_token_id"), "eos_token_id", path) + _eos_ids(
            gen.get("eos_token_id"), "generation_config.eos_token_id", path)
        if not eos:
            raise ConfigError("missing 'eos_token_id' in config.json and generation_config.json",
                              field="eos_token_id", path=path)
        eos_unique = tuple(dict.fromkeys(eos))
        mask = _req(text_d, "mask_token_id", int, "", path)
        block = _opt(text_d, "block_size", int, 32, "", path)
        _positive(block, "block_size", path)
        kw: dict[str, Any] = {}
        vision = None
        if mt == VLM_MODEL_TYPE:
            if not isinstance(d.get("vision_config"), dict):
                raise ConfigError("a VLM config needs a 'vision_config' object", field="vision_config", path=path)
            vision = VisionConfig.from_dict(d["vision_config"], path)
            act = _opt(d, "projector_hidden_act", str, "gelu", "", path)
            if act not in ("gelu", "silu"):
                raise ConfigError(f"unsupported 'projector_hidden_act' {act!r}", field="projector_hidden_act",
                                  path=path)
            vfl = _opt(d, "vision_feature_layer", int, -1, "", path)
            if not -(vision.num_hidden_layers + 1) <= vfl <= vision.num_hidden_layers:
                raise ConfigError(f"'vision_feature_layer' {vfl} is out of range for "
                                  f"{vision.num_hidden_layers} vision layers", field="vision_feature_layer", path=path)
            kw = dict(
                spatial_merge_size=_opt(d, "spatial_merge_size", int, 2, "", path),
                projector_hidden_act=act,
                multimodal_projector_bias=_opt(d, "multimodal_projector_bias", bool, False, "", path),
                vision_feature_layer=vfl,
            )
            _positive(kw["spatial_merge_size"], "spatial_merge_size", path)
            if kw["multimodal_projector_bias"]:
                raise ConfigError("'multimodal_projector_bias' true is not supported",
                                  field="multimodal_projector_bias", path=path)
            kw["image_encoder"] = ImageEncoderConfig.from_dict(preprocessor, vision.patch_size,
                                                               kw["spatial_merge_size"], path)
        special = SpecialTokens.resolve(d, tokens, path)
        if vision is not None:
            special.require("image_pad", path=path)
        cfg = cls(
            model_type=mt,
            text=text,
            mask_token_id=mask,
            eos_token_ids=eos_unique,
            bos_token_id=_opt(text_d, "bos_token_id", int, gen.get("bos_token_id"), "", path),
            pad_token_id=_opt(text_d, "pad_token_id", int, gen.get("pad_token_id"), "", path),
            block_size=block,
            dtype=d.get("dtype") or d.get("torch_dtype"),
            vision=vision,
            special=special,
            dlm_paradigm=d.get("dlm_paradigm"),
            raw=d,
            **kw,
        )
        ids = {"mask_token_id": cfg.mask_token_id, "bos_token_id": cfg.bos_token_id,
               "pad_token_id": cfg.pad_token_id,
               **{SpecialTokens.token_text(k): v for k, v in special.as_dict().items()}}
        ids.update({f"eos_token_id[{i}]": e for i, e in enumerate(cfg.eos_token_ids)})
        for name, v in ids.items():
            if v is not None and not 0 <= v < text.vocab_size:
                raise ConfigError(f"'{name}' {v} is outside the vocabulary [0, {text.vocab_size})", field=name,
                                  path=path)
        if cfg.mask_token_id in cfg.eos_token_ids:
            raise ConfigError(f"'mask_token_id' {cfg.mask_token_id} is also an EOS id", field="mask_token_id",
                              path=path)
        return cfg


def _eos_ids(v: Any, name: str, path: str | None) -> list[int]:
    if v is None:
        return []
    vals = v if isinstance(v, list) else [v]
    for x in vals:
        if not isinstance(x, int) or isinstance(x, bool):
            raise ConfigError(f"'{name}' must be an int or a list of ints, got {v!r}", field=name, path=path)
    return list(vals)


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path.name} not found", path=str(path))
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path.name} is not valid JSON: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} must hold a JSON object", path=str(path))
    return data


def read_added_tokens(root: str | Path) -> dict[str, int] | None:
    """Token string -> id of the added tokens in the tokenizer files of checkpoint directory ``root``:
    ``tokenizer_config.json``'s ``added_tokens_decoder`` (as transformers saves it) and ``tokenizer.json``'s
    ``added_tokens``, the former winning. ``tokenizer.json`` (17 MB for the 131k vocabulary) is parsed only when
    the decoder lacks one of the marker / chat tokens. None when the directory has neither file."""
    root = Path(root)
    from_config: dict[str, int] = {}
    tc = _read_json(root / "tokenizer_config.json", False)
    for i, t in ((tc or {}).get("added_tokens_decoder") or {}).items():
        if isinstance(t, dict) and isinstance(t.get("content"), str) and str(i).isdigit():
            from_config[t["content"]] = int(i)
    if all(text in from_config for text, _ in _TOKEN_NAMES.values()):
        return from_config
    tj = _read_json(root / "tokenizer.json", False)
    if tc is None and tj is None:
        return None
    found: dict[str, int] = {}
    for t in (tj or {}).get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int):
            found[t["content"]] = t["id"]
    return {**found, **from_config}


def load_config(path: str | Path) -> NLDConfig:
    """Read ``config.json`` (+ ``generation_config.json``, the tokenizer files' added tokens and an optional
    ``preprocessor_config.json``) in ``path``."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"checkpoint directory {root} does not exist")
    d = _read_json(root / "config.json", True)
    gen = _read_json(root / "generation_config.json", False)
    pre = _read_json(root / "preprocessor_config.json", False)
    assert d is not None
    return NLDConfig.from_dict(d, generation=gen, preprocessor=pre, tokens=read_added_tokens(root),
                               path=str(root / "config.json"))
