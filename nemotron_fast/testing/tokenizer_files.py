"""Tokenizer files (transformers format) for the tiny checkpoints, in the real NLD layout.

Two vocabularies share one special-token layout: ids 0..999 are special tokens, ordinary byte-level BPE tokens
start at 1000. The named slots are the real checkpoint's (``../shared/spec/nld-model.md``; the image markers
are checked at load by ``zojeda/jevons-rs``'s port of the VLM): ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``<|im_start|>`` 10, ``<|im_end|>`` 11 (the EOS), ``<think>`` 12 and ``</think>`` 13 (added tokens that are *not*
special, so they survive decoding), ``<|image_start|>`` 18, ``<|image_pad|>`` 19, ``<|image_break|>`` 20,
``<|image_end|>`` 21; the other slots are ``<SPECIAL_N>``, and ``<SPECIAL_100>`` is the config's MASK. A VLM
tokenizer also appends ``|<MASK>|`` right after the vocabulary (id 131072 for Tekken), as the real VLM tokenizer
does, and its config's ``vocab_size`` counts it.

- ``"tekken"``: the real 131072-token Tekken vocabulary shipped in ``mistral-common``
  (``mistral_common/data/tekken_240911.json``), converted offline into a ``tokenizer.json``. Conversion takes a
  few seconds, so the result is cached under ``$XDG_CACHE_HOME/nemotron_fast`` (``~/.cache/nemotron_fast``),
  keyed by a hash of the source file and of the special-token names.
- ``"small"``: the same 1000 specials followed by the 256 byte tokens and a few hundred merges trained with the
  ``tokenizers`` library on a small built-in English corpus (deterministic, a few milliseconds).

The chat template is ChatML as upstream renders it: no BOS, ``<|im_start|>{role}\n{content}<|im_end|>\n`` per
turn, each image of a message as one ``<|image_start|>`` placeholder (the processor replaces it by the image's
whole marker run), and a generation prompt ``<|im_start|>assistant\n`` followed by ``<think></think>`` (thinking
off, the default) or ``<think>\n`` (thinking on).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "write_tokenizer_files",
    "write_tokenizer_config",
    "special_token_names",
    "add_special_tokens",
    "tekken_source_path",
    "CHAT_TEMPLATE",
    "NAMED_SPECIALS",
    "NON_SPECIAL_ADDED",
    "VLM_MASK_TOKEN",
    "NUM_SPECIAL_TOKENS",
]

NUM_SPECIAL_TOKENS = 1000
# Bump when the conversion or the special names change, so stale caches are not reused.
_FORMAT_VERSION = 2

# The named slots of the real NLD tokenizer (ids as the spec and jevons-rs record them).
NAMED_SPECIALS: dict[int, str] = {
    0: "<unk>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>", 12: "<think>", 13: "</think>",
    18: "<|image_start|>", 19: "<|image_pad|>", 20: "<|image_break|>", 21: "<|image_end|>",
}
# Added tokens that the real tokenizer does not mark special (decoding keeps them).
NON_SPECIAL_ADDED = frozenset({"<think>", "</think>"})
# The VLM tokenizer's extra token right after the vocabulary.
VLM_MASK_TOKEN = "|<MASK>|"
_BOS, _EOS_ID, _MASK_ID = 1, 11, 100
_SMALL_MERGES = 400

# ChatML (see the module docstring). Jinja string literals carry the newlines, so `{%- -%}` trimming never eats them.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{ '<|image_start|>' }}"
    "{%- else -%}{{ raise_exception('unsupported content part type ' ~ part['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] in ['system', 'user', 'assistant'] -%}"
    "{{ '<|im_start|>' ~ m['role'] ~ '\\n' }}{{ render(m['content']) }}{{ '<|im_end|>\\n' }}"
    "{%- else -%}{{ raise_exception('unsupported role ' ~ m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{ '<think>\\n' }}"
    "{%- else -%}{{ '<think></think>' }}{%- endif -%}"
    "{%- endif -%}"
)

# The Tekken pre-tokenisation regex (facts from tekken_240911.json's config.pattern), used for both vocabs.
_TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SMALL_CORPUS = """\
A block diffusion language model writes its answer one block at a time. Every block starts as a row of mask
tokens, and the model fills in the positions it is most confident about, step after step, until no mask is left.
Then the finished block is written into the cache and the next block begins. The picture shows a small red house
next to a tall green tree. There is a white fence in front of the house and a blue car parked on the street.
What is in this image? Describe the image in one sentence. The cat is sitting on the window and looking at the
birds in the garden. How many people are in the photo? There are three people standing near the door.
The weather today is sunny and warm, with a light wind from the west. Please answer the question with a short
sentence. The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. It was the best of
times, it was the worst of times. The numbers are 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10. The answer is yes.
The answer is no. I think that the image shows a city street at night, with cars and bright lights. A person is
reading a book in the park. The dog runs after the ball and brings it back. Water boils at one hundred degrees.
This is a test of the tokenizer. The model reads the prompt, looks at the image, and then writes the answer.
"""


def special_token_names(n: int = NUM_SPECIAL_TOKENS) -> list[str]:
    """The first ``n`` special-token strings by id: :data:`NAMED_SPECIALS` where named, else ``<SPECIAL_N>``."""
    last = max(*NAMED_SPECIALS, _MASK_ID)
    if n <= last:
        raise ValueError(f"the NLD special layout needs more than {last} slots, got {n}")
    return [NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(n)]


def tekken_source_path() -> Path:
    """Path of the Tekken vocabulary file shipped in the ``mistral-common`` package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed mistral-common does not ship tekken_240911.json")
    return path


@lru_cache(maxsize=1)
def _byte_to_char() -> tuple[str, ...]:
    """GPT-2 byte-level alphabet: printable latin-1 bytes map to themselves, the rest to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _bytes_str(b: bytes) -> str:
    alphabet = _byte_to_char()
    return "".join(alphabet[x] for x in b)


def _base_tokenizer(model: Any) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_TEKKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def add_special_tokens(tok: Any, names: list[str], *, vlm_mask: bool) -> None:
    """Register ``names`` as added tokens at ids 0..n-1 of ``tok`` (a ``tokenizers.Tokenizer`` whose vocabulary
    already holds them there): special except :data:`NON_SPECIAL_ADDED`; with ``vlm_mask`` append
    :data:`VLM_MASK_TOKEN` after the vocabulary."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names
                            if n not in NON_SPECIAL_ADDED])
    tok.add_tokens([AddedToken(n, special=False, normalized=False) for n in names if n in NON_SPECIAL_ADDED])
    for i, n in enumerate(names):
        if tok.token_to_id(n) != i:
            raise RuntimeError(f"special token {n!r} landed on id {tok.token_to_id(n)}, expected {i}")
    if vlm_mask:
        size = tok.get_vocab_size(with_added_tokens=True)
        tok.add_special_tokens([AddedToken(VLM_MASK_TOKEN, special=True, normalized=False)])
        if tok.token_to_id(VLM_MASK_TOKEN) != size:
            raise RuntimeError(f"{VLM_MASK_TOKEN} landed on id {tok.token_to_id(VLM_MASK_TOKEN)}, expected {size}")


def _small_tokenizer_json(vlm: bool) -> str:
    from tokenizers import models, pre_tokenizers, trainers

    names = special_token_names()
    tok = _base_tokenizer(models.BPE(ignore_merges=True, fuse_unk=False))
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_SPECIAL_TOKENS + 256 + _SMALL_MERGES,
        special_tokens=names,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(_SMALL_CORPUS.splitlines(keepends=True), trainer)
    add_special_tokens(tok, names, vlm_mask=vlm)
    return tok.to_str()


def _tekken_tokenizer_json(source: Path, vlm: bool) -> str:
    """Convert tiktoken-style ranks to a HF byte-level BPE: merges ordered by the rank of the merged token."""
    from tokenizers import models

    raw = json.loads(source.read_text(encoding="utf-8"))
    conf = raw["config"]
    n_special = conf["default_num_special_tokens"]
    if n_special != NUM_SPECIAL_TOKENS:
        raise ValueError(f"{source} has {n_special} special tokens, expected {NUM_SPECIAL_TOKENS}")
    inner = conf["default_vocab_size"] - n_special
    ranks = {base64.b64decode(e["token_bytes"]): r for r, e in enumerate(raw["vocab"][:inner])}
    if len(ranks) != inner:
        raise ValueError(f"{source}: duplicate token bytes in the first {inner} entries")
    names = special_token_names()
    vocab = {name: i for i, name in enumerate(names)}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        s = _bytes_str(token)
        if s in vocab:
            raise ValueError(f"BPE token {s!r} collides with a special token name")
        vocab[s] = rank + n_special
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            rl, rr = ranks.get(left), ranks.get(right)
            if rl is not None and rr is not None:
                merges.append((rank, rl, rr, left, right))
    merges.sort(key=lambda m: m[:3])
    pairs = [(_bytes_str(m[3]), _bytes_str(m[4])) for m in merges]
    tok = _base_tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=True, fuse_unk=False))
    add_special_tokens(tok, names, vlm_mask=vlm)
    return tok.to_str()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nemotron_fast"


def _cached_tekken_json(vlm: bool) -> Path:
    """Path of the converted Tekken ``tokenizer.json``, converting once and caching by content hash."""
    source = tekken_source_path()
    h = hashlib.sha256(source.read_bytes())
    h.update(json.dumps([_FORMAT_VERSION, special_token_names(), sorted(NON_SPECIAL_ADDED), vlm]).encode())
    target = _cache_dir() / f"tekken-{h.hexdigest()[:20]}.tokenizer.json"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    text = _tekken_tokenizer_json(source, vlm)
    # Write then rename, so concurrent writers never expose a half-written file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tekken-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def write_tokenizer_config(out: Path, specials: dict[str, str]) -> int:
    """Write ``tokenizer_config.json`` (fast tokenizer, the ChatML template, no automatic BOS/EOS, and the
    ``added_tokens_decoder`` of the ``tokenizer.json`` already in ``out``, as transformers saves it) and
    ``special_tokens_map.json``; returns the tokenizer's size (added tokens included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    added = tok.get_added_tokens_decoder()
    tok_config: dict[str, Any] = {
        "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                          "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                                 for i, t in sorted(added.items())},
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def nld_special_roles(names: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """The ``special_tokens_map`` entries and the config ids (bos/eos/pad/mask) of the NLD layout ``names``."""
    specials = {"bos_token": names[_BOS], "eos_token": names[_EOS_ID], "unk_token": names[0],
                "pad_token": names[_EOS_ID], "mask_token": names[_MASK_ID]}
    return specials, {"bos_token_id": _BOS, "eos_token_id": _EOS_ID, "pad_token_id": _EOS_ID,
                      "mask_token_id": _MASK_ID}


def write_tokenizer_files(path: str | Path, *, vocab: Literal["small", "tekken"], vlm: bool) -> dict[str, int]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``path``.

    Returns ``vocab_size`` (the tokenizer's size: 131072 for ``"tekken"``, 131073 with the VLM's ``|<MASK>|``,
    about 1650 for ``"small"``) and the config ids ``bos_token_id`` (1), ``eos_token_id`` (11, ``<|im_end|>``),
    ``pad_token_id`` (11) and ``mask_token_id`` (100), ready for :func:`nemotron_fast.testing.tiny_config_dict`.
    The image markers and chat tokens are not returned: like the real config, ours does not hold them, and the
    package resolves them from these files by name.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if vocab == "tekken":
        shutil.copyfile(_cached_tekken_json(vlm), out / "tokenizer.json")
    elif vocab == "small":
        (out / "tokenizer.json").write_text(_small_tokenizer_json(vlm), encoding="utf-8")
    else:
        raise ValueError(f"vocab must be 'small' or 'tekken', got {vocab!r}")
    specials, ids = nld_special_roles(special_token_names())
    return {"vocab_size": write_tokenizer_config(out, specials), **ids}
