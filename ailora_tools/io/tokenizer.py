"""The tokenizer a training run uses: from the base model, or from `--tokenizer DIR_OR_HUB_ID`.

Handles what users' tokenizers are like: only a sentencepiece `tokenizer.model` (older Llama and Mistral
checkpoints), which transformers can read only with the `sentencepiece` and `protobuf` packages (both are
dependencies of this project; without them transformers fails with a misleading message about
`tiktoken`, which is replaced here by one naming what to install); and no pad token (most Llama
tokenizers), where the end-of-sequence token pads (padding is masked out of attention and loss anyway).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import InputNotFoundError, UnsupportedError

#: files any one of which makes a directory a tokenizer for AutoTokenizer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
SENTENCEPIECE_PACKAGES = ("sentencepiece", "google.protobuf")


def load_tokenizer(source: str | os.PathLike, *, flag: str = "--tokenizer"):
    """Load a tokenizer from a directory or Hub id and make sure it can pad.

    Args:
        source: a directory with tokenizer files, or a Hub repo id (the HF cache and HF_HUB_OFFLINE apply).
        flag: the option `source` came from, for error messages (e.g. "--base").

    Returns:
        (tokenizer, pad_id): pad_id is the pad token, else end-of-sequence, else unknown, else 0.

    Raises:
        InputNotFoundError: a directory without tokenizer files, or a Hub id that cannot be loaded.
        UnsupportedError: a sentencepiece tokenizer while `sentencepiece` or `protobuf` is missing.

    Example:
        >>> tok, pad = load_tokenizer("meta-llama/Llama-2-7b-hf")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    path = Path(source)
    is_dir = path.is_dir()
    if is_dir and not any((path / f).is_file() for f in TOKENIZER_FILES):
        hint = " or pass --tokenizer DIR_OR_HUB_ID (e.g. the original model)" if flag != "--tokenizer" else ""
        raise InputNotFoundError(
            f"{flag} {source}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); copy the "
            f"original model's tokenizer files into it{hint}"
        )
    if is_dir and not (path / "tokenizer.json").is_file() and any((path / f).is_file() for f in SENTENCEPIECE_FILES):
        _require_sentencepiece(flag, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except ValueError as e:
        if "tiktoken" in str(e):  # transformers' last fallback when it cannot read a sentencepiece model
            _require_sentencepiece(flag, source)
        raise
    except OSError as e:
        why = " ".join(str(e).split())[:200]
        raise InputNotFoundError(
            f"{flag} {source}: cannot load a tokenizer from it ({why}); pass a directory with "
            "tokenizer files or a Hub id that is in the HF cache"
        ) from e
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, 0):
        if candidate is not None:
            return tokenizer, int(candidate)


def _require_sentencepiece(flag: str, source) -> None:
    missing = [name.split(".")[-1] for name in SENTENCEPIECE_PACKAGES if not _importable(name)]
    if missing:
        raise UnsupportedError(
            f"{flag} {source}: its tokenizer is a sentencepiece model, which transformers reads "
            "only with the packages sentencepiece and protobuf; missing here: "
            f"{', '.join(missing)}; "
            "run `pip install sentencepiece protobuf`"
        )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False
