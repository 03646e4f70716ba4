"""A tiny, randomly initialised multilingual Whisper in CTranslate2 format, built offline.

transformers builds the network (2 layers, d_model 64) with the real multilingual vocabulary size (51865),
ctranslate2's `TransformersConverter` converts it, and the vocabulary comes from the tiktoken ranks that
openai-whisper ships (`whisper/assets/multilingual.tiktoken`), turned into a byte-level `tokenizers` file.
Rank 50256 is the empty token: it must stay, or every later id shifts and the model loads as English-only.
Nothing is downloaded. The model's output is noise; tests check the structure of what it produces.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import warnings
from pathlib import Path

__all__ = ["build_tiny_model"]

_SPECIALS_BEFORE_LANGUAGES = ["<|endoftext|>", "<|startoftranscript|>"]
_SPECIALS_AFTER_LANGUAGES = [
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
# The multilingual vocabulary before large-v3: 99 languages, 51865 ids with the 1501 timestamps.
_LANGUAGES = 99
VOCAB_SIZE = 51865


def _ranks_file() -> Path:
    spec = importlib.util.find_spec("whisper")
    assert spec is not None, "openai-whisper (installed --no-deps) is needed"
    assert spec.origin is not None
    return Path(spec.origin).parent / "assets" / "multilingual.tiktoken"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 byte values)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def _languages() -> list[str]:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    codes = [code for code in _LANGUAGE_CODES if code != "yue"]
    assert len(codes) == _LANGUAGES
    return codes


def _write_tokenizer(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for line in _ranks_file().read_text().splitlines():
        if not line:
            continue
        token, rank = line.split()
        text = "".join(alphabet[b] for b in base64.b64decode(token))
        vocab[text] = int(rank)
    assert vocab.get("") == 50256, "rank 50256 must be the empty token"
    assert len(vocab) == 50257
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        *_SPECIALS_BEFORE_LANGUAGES,
        *(f"<|{code}|>" for code in _languages()),
        *_SPECIALS_AFTER_LANGUAGES,
    ]
    tokenizer.add_special_tokens(specials)
    ids = {token: tokenizer.token_to_id(token) for token in specials}
    assert ids["<|endoftext|>"] == 50257, ids
    assert ids["<|notimestamps|>"] == 50363, ids
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 448})
    )
    return ids


def build_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """Write the CTranslate2 model into `folder` (created) and return it."""
    import ctranslate2
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    source = folder.parent / f"{folder.name}-transformers"
    source.mkdir(parents=True)
    ids = _write_tokenizer(source)
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=VOCAB_SIZE,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        suppress_tokens=[],
        begin_suppress_tokens=[220, ids["<|endoftext|>"]],
        alignment_heads=[[1, 0], [1, 1]],
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in _languages()},
        decoder_start_token_id=ids["<|startoftranscript|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(source)
        converter = ctranslate2.converters.TransformersConverter(
            str(source), copy_files=["tokenizer.json"], load_as_float16=False
        )
        converter.convert(str(folder), quantization=None, force=True)
    return folder
