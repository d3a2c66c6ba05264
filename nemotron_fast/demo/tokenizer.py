"""The demo model's tokenizer: a small byte-level BPE trained on the scene corpus, saved in the transformers
format with the real NLD special-token layout and chat template of the project's tiny checkpoints
(:mod:`nemotron_fast.testing.tokenizer_files`).

The special block is ids 0..100, the real checkpoint's slots: ``<s>`` 1, ``<|im_start|>`` 10, ``<|im_end|>`` 11
(the EOS), ``<think>`` 12, ``</think>`` 13, the image markers 18-21, and ``<SPECIAL_100>`` the config's MASK;
like the real VLM tokenizer it ends with ``|<MASK>|``. Nothing in the package relies on these numbers:
:func:`write_tokenizer` returns the config ids and the package resolves the markers by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..testing.tokenizer_files import add_special_tokens, nld_special_roles, special_token_names
from .scenes import COLOURS, DESCRIBE_PROMPTS, NUMBER_WORDS, SHAPES, make_scene, scene_seed

__all__ = ["SPECIAL_TOKENS", "scene_corpus", "train_tokenizer", "write_tokenizer", "read_token_ids"]

# The NLD layout up to the MASK slot (100): the smallest block that holds every real id.
SPECIAL_TOKENS: tuple[str, ...] = tuple(special_token_names(101))
_SPECIALS_MAP, _ROLE_IDS = nld_special_roles(list(SPECIAL_TOKENS))
_ROLES = {role: SPECIAL_TOKENS[i] for role, i in _ROLE_IDS.items()}
# Enough merges to make every corpus word one token; the trainer stops earlier when pairs run out.
_MAX_MERGES = 400
_CORPUS_SCENES = 3000


def scene_corpus(n_scenes: int = _CORPUS_SCENES) -> Iterator[str]:
    """Deterministic text corpus: every word of the scene language, then the text of ``n_scenes`` scenes."""
    words = [*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBER_WORDS, "yes", "no", "nothing", "the", "a", "an",
             "shape", "shapes"]
    yield " ".join(words) + " " + " ".join(w.capitalize() for w in words)
    yield from DESCRIBE_PROMPTS
    for i in range(n_scenes):
        s = make_scene(scene_seed("train", 0, i))
        yield s.caption
        for qa in s.qa:
            yield qa.question
            yield qa.answer


def train_tokenizer(corpus: Iterable[str]) -> Any:
    """Train the byte-level BPE (a ``tokenizers.Tokenizer``) with :data:`SPECIAL_TOKENS` at ids 0..N-1 and
    ``|<MASK>|`` last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + 256 + _MAX_MERGES,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    add_special_tokens(tok, list(SPECIAL_TOKENS), vlm_mask=True)
    return tok


def write_tokenizer(path: str | Path, corpus: Iterable[str] | None = None) -> dict[str, int]:
    """Train on ``corpus`` (default :func:`scene_corpus`) and write ``tokenizer.json``, ``tokenizer_config.json``
    and ``special_tokens_map.json`` into ``path``.

    Returns ``vocab_size`` and the config ids (``bos_token_id``, ``eos_token_id``, ``pad_token_id``,
    ``mask_token_id``) for ``config.json``.
    """
    from ..testing.tokenizer_files import write_tokenizer_config

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(scene_corpus() if corpus is None else corpus)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out, _SPECIALS_MAP)
    ids = {role: tok.token_to_id(name) for role, name in _ROLES.items()}
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), **ids}


def read_token_ids(path: str | Path) -> dict[str, int]:
    """``vocab_size`` and the role ids of the tokenizer files in ``path`` (as :func:`write_tokenizer` returns)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    ids = {role: tok.token_to_id(name) for role, name in _ROLES.items()}
    missing = [role for role, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{path}/tokenizer.json lacks the special tokens for {missing}")
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), **ids}
