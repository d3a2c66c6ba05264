"""Tokenizer files (transformers format) for the tiny checkpoints.

Two vocabularies share one special-token layout, the Tekken one: ids 0..999 are special tokens, ordinary
byte-level BPE tokens start at 1000.

- ``"tekken"``: the real 131072-token Tekken vocabulary shipped in ``mistral-common``
  (``mistral_common/data/tekken_240911.json``), converted offline into a ``tokenizer.json``. Conversion takes a
  few seconds, so the result is cached under ``$XDG_CACHE_HOME/nemotron_fast`` (``~/.cache/nemotron_fast``),
  keyed by a hash of the source file and of the special-token names.
- ``"small"``: the same 1000 specials followed by the 256 byte tokens and a few hundred merges trained with the
  ``tokenizers`` library on a small built-in English corpus (deterministic, a few milliseconds).

Two slots get the roles NLD's config gives them: id 11 (Tekken's ``<pad>`` slot) is the EOS and id 100 is the
MASK. The chat template is Mistral style and ends an assistant turn with the EOS string.
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
    "tekken_source_path",
    "CHAT_TEMPLATE",
    "THINKING_INSTRUCTION",
    "NUM_SPECIAL_TOKENS",
]

NUM_SPECIAL_TOKENS = 1000
# Bump when the conversion or the special names change, so stale caches are not reused.
_FORMAT_VERSION = 1

# Ids 0..19 as mistral-common's Tekkenizer lays them out (DEPRECATED_SPECIAL_TOKENS), except slot 11.
_TEKKEN_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
_BOS, _EOS_ID, _MASK_ID = 1, 11, 100
_IMG, _IMG_BREAK, _IMG_END = 10, 12, 13
# NLD's config makes slot 11 (Tekken's "<pad>") the end of a completion; it also serves as the pad token.
_EOS_NAME = "<|eos|>"
_MASK_NAME = "<|mask|>"
_SMALL_MERGES = 400

THINKING_INSTRUCTION = "Think step by step before you answer, then give the final answer."

# Mistral style: <s>[SYSTEM_PROMPT]..[/SYSTEM_PROMPT][INST]user[/INST]assistant<|eos|>...
# The assistant turn starts right after [/INST], so add_generation_prompt adds nothing. Image parts render as
# one [IMG] placeholder each, which the processor expands to the image's token layout.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}[IMG]"
    "{%- else -%}{{ raise_exception('unsupported content part type ' ~ part['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if enable_thinking is defined and enable_thinking -%}"
    "{%- set system = (system ~ '\\n\\n' if system else '') ~ '" + THINKING_INSTRUCTION + "' -%}"
    "{%- endif -%}"
    "{{ bos_token }}"
    "{%- if system -%}[SYSTEM_PROMPT]{{ system }}[/SYSTEM_PROMPT]{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}[INST]{{ render(m['content']) }}[/INST]"
    "{%- elif m['role'] == 'assistant' -%}{{ render(m['content']) }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unsupported role ' ~ m['role'] ~ ' (user/assistant after one system)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
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


def special_token_names() -> list[str]:
    """The 1000 special-token strings by id (Tekken layout; id 11 is the EOS, id 100 the MASK)."""
    names = list(_TEKKEN_SPECIALS) + [f"<SPECIAL_{i}>" for i in range(len(_TEKKEN_SPECIALS), NUM_SPECIAL_TOKENS)]
    names[_EOS_ID] = _EOS_NAME
    names[_MASK_ID] = _MASK_NAME
    return names


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


def _add_specials(tok: Any, names: list[str]) -> None:
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    for i, n in enumerate(names):
        if tok.token_to_id(n) != i:
            raise RuntimeError(f"special token {n!r} landed on id {tok.token_to_id(n)}, expected {i}")


def _small_tokenizer_json() -> str:
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
    _add_specials(tok, names)
    return tok.to_str()


def _tekken_tokenizer_json(source: Path) -> str:
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
    _add_specials(tok, names)
    return tok.to_str()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nemotron_fast"


def _cached_tekken_json() -> Path:
    """Path of the converted Tekken ``tokenizer.json``, converting once and caching by content hash."""
    source = tekken_source_path()
    h = hashlib.sha256(source.read_bytes())
    h.update(json.dumps([_FORMAT_VERSION, special_token_names()]).encode())
    target = _cache_dir() / f"tekken-{h.hexdigest()[:20]}.tokenizer.json"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    text = _tekken_tokenizer_json(source)
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


def write_tokenizer_config(out: Path, specials: dict[str, str], image_tokens: dict[str, str] | None) -> None:
    """Write ``tokenizer_config.json`` (fast tokenizer, the chat template, no automatic BOS/EOS; the image
    tokens' names when given) and ``special_tokens_map.json`` beside a ``tokenizer.json``."""
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "chat_template": CHAT_TEMPLATE,
    }
    if image_tokens is not None:
        tok_config["extra_special_tokens"] = dict(image_tokens)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")


def write_tokenizer_files(path: str | Path, *, vocab: Literal["small", "tekken"], vlm: bool) -> dict[str, int]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``path``.

    Returns ``vocab_size`` (the tokenizer's size: 131072 for ``"tekken"``, about 1650 for ``"small"``) and the
    ids ``bos_token_id`` (1), ``eos_token_id`` (11), ``pad_token_id`` (11), ``mask_token_id`` (100),
    ``image_token_id`` (10), ``image_break_token_id`` (12), ``image_end_token_id`` (13), ready for
    :func:`nemotron_fast.testing.tiny_config_dict`. ``vlm`` only documents the intent: both kinds of
    checkpoint get the same files, the image ids are simply unused by a text model.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if vocab == "tekken":
        shutil.copyfile(_cached_tekken_json(), out / "tokenizer.json")
        vocab_size = 131072
    elif vocab == "small":
        text = _small_tokenizer_json()
        (out / "tokenizer.json").write_text(text, encoding="utf-8")
        vocab_size = len(json.loads(text)["model"]["vocab"])
    else:
        raise ValueError(f"vocab must be 'small' or 'tekken', got {vocab!r}")
    names = special_token_names()
    specials = {"bos_token": names[_BOS], "eos_token": _EOS_NAME, "unk_token": names[0], "pad_token": _EOS_NAME,
                "mask_token": _MASK_NAME}
    image_tokens = None
    if vlm:
        image_tokens = {"image_token": names[_IMG], "image_break_token": names[_IMG_BREAK],
                        "image_end_token": names[_IMG_END]}
    write_tokenizer_config(out, specials, image_tokens)
    return {
        "vocab_size": vocab_size,
        "bos_token_id": _BOS,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _EOS_ID,
        "mask_token_id": _MASK_ID,
        "image_token_id": _IMG,
        "image_break_token_id": _IMG_BREAK,
        "image_end_token_id": _IMG_END,
    }
