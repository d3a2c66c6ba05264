"""Tokenizer files of the tiny checkpoints: special-token layout, chat template, Tekken parity, config round trip."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nemotron_fast.config import load_config
from nemotron_fast.testing import write_tiny_checkpoint
from nemotron_fast.testing.tokenizer_files import (
    NUM_SPECIAL_TOKENS,
    THINKING_INSTRUCTION,
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
EXPECTED_IDS = {"bos_token_id": 1, "eos_token_id": 11, "pad_token_id": 11, "mask_token_id": 100,
                "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13}


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


def test_special_names_follow_mistral_common_layout() -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    names = special_token_names()
    assert len(names) == NUM_SPECIAL_TOKENS == len(set(names))
    for info in Tekkenizer.DEPRECATED_SPECIAL_TOKENS:
        rank, name = info["rank"], str(getattr(info["token_str"], "value", info["token_str"]))
        # Slot 11 is Tekken's <pad>; NLD's config makes it the EOS.
        assert names[rank] == (name if rank != 11 else "<|eos|>"), rank
    assert names[100] == "<|mask|>"
    assert names[20] == "<SPECIAL_20>" and names[999] == "<SPECIAL_999>"


def test_small_files_ids_and_layout(small_dir, small_tok) -> None:
    d, ids = small_dir
    assert {k: ids[k] for k in EXPECTED_IDS} == EXPECTED_IDS
    assert ids["vocab_size"] == len(small_tok)
    # 1000 specials + 256 bytes + a few hundred merges
    assert NUM_SPECIAL_TOKENS + 256 + 200 <= ids["vocab_size"] <= 3000
    for name, i in [("<s>", 1), ("[INST]", 3), ("[/INST]", 4), ("[IMG]", 10), ("<|eos|>", 11), ("[IMG_BREAK]", 12),
                    ("[IMG_END]", 13), ("[SYSTEM_PROMPT]", 17), ("[/SYSTEM_PROMPT]", 18), ("<|mask|>", 100)]:
        assert small_tok.convert_tokens_to_ids(name) == i
    assert small_tok.eos_token_id == 11 and small_tok.bos_token_id == 1 and small_tok.mask_token_id == 100
    assert small_tok.pad_token_id == 11
    # ordinary tokens never use the special range
    for s in SENTENCES:
        assert min(small_tok.encode(s, add_special_tokens=False)) >= NUM_SPECIAL_TOKENS
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|eos|>" and "chat_template" in cfg
    assert json.loads((d / "special_tokens_map.json").read_text())["bos_token"] == "<s>"


def test_small_is_deterministic(tmp_path: Path, small_dir) -> None:
    write_tokenizer_files(tmp_path, vocab="small", vlm=False)
    assert (tmp_path / "tokenizer.json").read_bytes() == (small_dir[0] / "tokenizer.json").read_bytes()


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
    assert ids["vocab_size"] == 131072 == len(tekken_tok)
    assert {k: ids[k] for k in EXPECTED_IDS} == EXPECTED_IDS
    ref = Tekkenizer.from_file(tekken_source_path())
    for text in SENTENCES:
        got = tekken_tok.encode(text, add_special_tokens=False)
        assert got == ref.encode(text, bos=False, eos=False), text
        assert tekken_tok.decode(got) == text
    assert tekken_tok.convert_tokens_to_ids("[IMG_END]") == 13


def test_tekken_write_is_fast_once_cached(tmp_path: Path, tekken_dir) -> None:
    assert any(_cache_dir().glob("tekken-*.tokenizer.json"))
    t0 = time.perf_counter()
    write_tokenizer_files(tmp_path, vocab="tekken", vlm=False)
    assert time.perf_counter() - t0 < 2.0
    assert (tmp_path / "tokenizer.json").read_bytes() == (tekken_dir[0] / "tokenizer.json").read_bytes()


def test_bad_vocab_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab must be"):
        write_tokenizer_files(tmp_path, vocab="big", vlm=True)  # type: ignore[arg-type]


# --- chat template ---------------------------------------------------------------------------------------------

def _render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def test_chat_template_shapes(small_tok) -> None:
    user = {"role": "user", "content": "Hi"}
    assert _render(small_tok, [user]) == "<s>[INST]Hi[/INST]"
    assert _render(small_tok, [{"role": "system", "content": "Be brief."}, user]) == (
        "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]")
    assert _render(small_tok, [user], enable_thinking=True) == (
        f"<s>[SYSTEM_PROMPT]{THINKING_INSTRUCTION}[/SYSTEM_PROMPT][INST]Hi[/INST]")
    assert _render(small_tok, [{"role": "system", "content": "S"}, user], enable_thinking=True) == (
        f"<s>[SYSTEM_PROMPT]S\n\n{THINKING_INSTRUCTION}[/SYSTEM_PROMPT][INST]Hi[/INST]")
    assert _render(small_tok, [user], enable_thinking=False) == "<s>[INST]Hi[/INST]"
    multi = [user, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert _render(small_tok, multi) == "<s>[INST]Hi[/INST]Hello.<|eos|>[INST]Bye[/INST]"
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A"},
                                          {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text",
                                                                                            "text": "B"}]}]
    assert _render(small_tok, parts) == "<s>[INST][IMG]A[IMG]B[/INST]"


def test_chat_template_rejects_unknown_role(small_tok) -> None:
    with pytest.raises(Exception, match="unsupported role"):
        _render(small_tok, [{"role": "tool", "content": "x"}])


def test_chat_template_round_trip_ids(small_tok) -> None:
    text = _render(small_tok, [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}])
    ids = small_tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [1, 17] and ids[-1] == 4 and ids.count(10) == 1
    assert small_tok.decode(ids) == text


# --- tiny checkpoints --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,vlm", [("small", True), ("small", False), ("tekken", True)])
def test_tiny_checkpoint_config_loads(tmp_path: Path, vocab: str, vlm: bool, tekken_dir) -> None:
    write_tiny_checkpoint(tmp_path, vocab=vocab, vlm=vlm, hidden_size=32, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, num_hidden_layers=1)
    cfg = load_config(tmp_path)
    assert cfg.is_vlm == vlm
    assert cfg.vocab_size == (131072 if vocab == "tekken" else len(_load(tmp_path)))
    assert cfg.eos_token_ids == (11,) and cfg.mask_token_id == 100 and cfg.bos_token_id == 1
    if vlm:
        assert (cfg.image_token_id, cfg.image_break_token_id, cfg.image_end_token_id) == (10, 12, 13)
        assert cfg.preprocessor is not None
