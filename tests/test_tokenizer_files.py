"""Tokenizer files of the tiny checkpoints: the real NLD special-token layout, ChatML template, Tekken parity,
config round trip.

The expected values are the facts recorded in ``../shared/spec/nld-model.md`` from public sources: the image
markers at 18-21 (``zojeda/jevons-rs`` refuses a tokenizer that maps them elsewhere), ``<|im_end|>`` 11 the EOS,
MASK 100, the VLM's extra ``|<MASK>|`` at the end of the vocabulary, think tags as non-special added tokens, and
the ChatML prompt jevons-rs' reference dump builds (no BOS, ``<think></think>`` after the assistant header).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemotron_fast.config import load_config
from nemotron_fast.testing import write_tiny_checkpoint
from nemotron_fast.testing.tokenizer_files import (
    NUM_SPECIAL_TOKENS,
    _cache_dir,
    special_token_names,
    tekken_source_path,
    write_tokenizer_files,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, naïve café 123 — 日本語!\n\n  trailing spaces   ",
    "def square(x):\n    return x ** 2  # comment\n",
    "emoji 😀👍🏽 and umlauts ÄÖÜß, URL https://example.com/a?b=c&d=e",
]
EXPECTED_IDS = {"bos_token_id": 1, "eos_token_id": 11, "pad_token_id": 11, "mask_token_id": 100}
NAMED = [("<unk>", 0), ("<s>", 1), ("</s>", 2), ("<|im_start|>", 10), ("<|im_end|>", 11), ("<think>", 12),
         ("</think>", 13), ("<|image_start|>", 18), ("<|image_pad|>", 19), ("<|image_break|>", 20),
         ("<|image_end|>", 21), ("<SPECIAL_100>", 100)]


def _load(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    d = tmp_path_factory.mktemp("small_tok")
    return d, write_tokenizer_files(d, vocab="small", vlm=True)


@pytest.fixture(scope="module")
def tekken_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    d = tmp_path_factory.mktemp("tekken_tok")
    return d, write_tokenizer_files(d, vocab="tekken", vlm=True)


@pytest.fixture(scope="module")
def small_tok(small_dir):
    return _load(small_dir[0])


@pytest.fixture(scope="module")
def tekken_tok(tekken_dir):
    return _load(tekken_dir[0])


def test_special_names_follow_the_nld_layout() -> None:
    names = special_token_names()
    assert len(names) == NUM_SPECIAL_TOKENS == len(set(names))
    for name, i in NAMED:
        assert names[i] == name
    assert names[3] == "<SPECIAL_3>" and names[999] == "<SPECIAL_999>"
    with pytest.raises(ValueError, match="needs more than 100 slots"):
        special_token_names(100)


def _check_layout(tok, vocab_size: int, vlm: bool) -> None:
    for name, i in NAMED:
        assert tok.convert_tokens_to_ids(name) == i, name
    assert tok.eos_token_id == 11 and tok.bos_token_id == 1 and tok.pad_token_id == 11
    assert tok.mask_token_id == 100
    decoder = tok.added_tokens_decoder
    assert not decoder[12].special and not decoder[13].special  # think tags survive decoding
    assert decoder[19].special and decoder[10].special
    if vlm:
        assert tok.convert_tokens_to_ids("|<MASK>|") == vocab_size - 1 and decoder[vocab_size - 1].special
    else:
        assert "|<MASK>|" not in tok.get_vocab()
    assert len(tok) == vocab_size


def test_small_files_ids_and_layout(small_dir, small_tok) -> None:
    d, ids = small_dir
    assert {k: ids[k] for k in EXPECTED_IDS} == EXPECTED_IDS
    _check_layout(small_tok, ids["vocab_size"], vlm=True)
    # 1000 specials + 256 bytes + a few hundred merges + |<MASK>|
    assert NUM_SPECIAL_TOKENS + 256 + 200 <= ids["vocab_size"] <= 3000
    # ordinary tokens never use the special range
    for s in SENTENCES:
        assert min(small_tok.encode(s, add_special_tokens=False)) >= NUM_SPECIAL_TOKENS
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and "chat_template" in cfg and cfg["add_bos_token"] is False
    assert json.loads((d / "special_tokens_map.json").read_text())["bos_token"] == "<s>"


def test_small_is_deterministic_and_text_lacks_the_vlm_mask(tmp_path: Path, small_dir) -> None:
    write_tokenizer_files(tmp_path / "a", vocab="small", vlm=True)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (small_dir[0] / "tokenizer.json").read_bytes()
    ids = write_tokenizer_files(tmp_path / "b", vocab="small", vlm=False)
    assert ids["vocab_size"] == small_dir[1]["vocab_size"] - 1
    _check_layout(_load(tmp_path / "b"), ids["vocab_size"], vlm=False)


@pytest.mark.parametrize("text", SENTENCES)
def test_small_round_trip(small_tok, text: str) -> None:
    ids = small_tok.encode(text, add_special_tokens=False)
    assert small_tok.decode(ids) == text
    # a byte-level BPE with merges: common English is shorter in tokens than in bytes
    if text.startswith("The quick"):
        assert len(ids) < len(text.encode()) // 2


def test_tekken_vocab_and_parity_with_mistral_common(tekken_dir, tekken_tok) -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    d, ids = tekken_dir
    assert ids["vocab_size"] == 131073 == len(tekken_tok)  # the VLM's |<MASK>| at 131072
    assert {k: ids[k] for k in EXPECTED_IDS} == EXPECTED_IDS
    _check_layout(tekken_tok, 131073, vlm=True)
    ref = Tekkenizer.from_file(tekken_source_path())
    for text in SENTENCES:
        got = tekken_tok.encode(text, add_special_tokens=False)
        assert got == ref.encode(text, bos=False, eos=False), text
        assert tekken_tok.decode(got) == text


def test_tekken_conversion_is_cached_per_kind(tmp_path: Path, tekken_dir) -> None:
    cached = sorted(_cache_dir().glob("tekken-*.tokenizer.json"))
    assert cached
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    write_tokenizer_files(tmp_path, vocab="tekken", vlm=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tekken_dir[0] / "tokenizer.json").read_bytes()
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # read from the cache, not rewritten


def test_bad_vocab_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab must be"):
        write_tokenizer_files(tmp_path, vocab="big", vlm=True)  # type: ignore[arg-type]


# --- chat template ---------------------------------------------------------------------------------------------

def _render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def test_chat_template_is_upstream_chatml(small_tok) -> None:
    user = {"role": "user", "content": "Hi"}
    head = "<|im_start|>assistant\n"
    assert _render(small_tok, [user]) == f"<|im_start|>user\nHi<|im_end|>\n{head}<think></think>"
    assert _render(small_tok, [user], enable_thinking=False) == _render(small_tok, [user])
    assert _render(small_tok, [user], enable_thinking=True) == f"<|im_start|>user\nHi<|im_end|>\n{head}<think>\n"
    assert _render(small_tok, [{"role": "system", "content": "Be brief."}, user]) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n{head}<think></think>")
    multi = [user, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert _render(small_tok, multi) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                                         f"<|im_start|>user\nBye<|im_end|>\n{head}<think></think>")
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A"},
                                          {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text",
                                                                                            "text": "B"}]}]
    assert _render(small_tok, parts) == (
        f"<|im_start|>user\n<|image_start|>A<|image_start|>B<|im_end|>\n{head}<think></think>")


def test_chat_template_rejects_unknown_role(small_tok) -> None:
    with pytest.raises(Exception, match="unsupported role"):
        _render(small_tok, [{"role": "tool", "content": "x"}])


def test_chat_template_round_trip_ids(small_tok) -> None:
    text = _render(small_tok, [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}])
    ids = small_tok(text)["input_ids"]  # the tokenizer's defaults, as upstream calls it: no BOS
    assert ids[0] == 10 and ids[-2:] == [12, 13] and ids.count(18) == 1 and ids.count(11) == 2
    assert small_tok.decode(ids) == text


# --- tiny checkpoints --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,vlm", [("small", True), ("small", False), ("tekken", True)])
def test_tiny_checkpoint_config_loads(tmp_path: Path, vocab: str, vlm: bool, tekken_dir) -> None:
    write_tiny_checkpoint(tmp_path, vocab=vocab, vlm=vlm, hidden_size=32, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, num_hidden_layers=1)
    cfg = load_config(tmp_path)
    assert cfg.is_vlm == vlm
    assert cfg.vocab_size == len(_load(tmp_path))
    if vocab == "tekken":
        assert cfg.vocab_size == 131073
    assert cfg.eos_token_ids == (11,) and cfg.mask_token_id == 100 and cfg.bos_token_id == 1
    raw = json.loads((tmp_path / "config.json").read_text())
    assert not [k for k in raw if "image" in k]  # like the real config: no marker ids
    assert not (tmp_path / "preprocessor_config.json").exists()
    assert (cfg.special.image_start, cfg.special.image_pad, cfg.special.image_break, cfg.special.image_end) == (
        18, 19, 20, 21)
    assert (cfg.special.im_start, cfg.special.im_end, cfg.special.think, cfg.special.think_end) == (10, 11, 12, 13)
    if vlm:
        assert cfg.image_encoder is not None and cfg.image_encoder.max_image_size == 1400
