"""Token vocabularies beyond dblocks.text's characters: a SentencePiece model the user supplies (LM1B, paper §5.5).
A tfds text dataset is tokenized once, packed into fixed-length windows and cached; your own text (text:, jsonl:,
hf:) is tokenized line by line in memory. Both encode in batches of ENCODE_BATCH lines (one SentencePiece call each).

SentencePiece is not a requirement of dblocks: it is imported only when `config.data.tokenizer` is set, and a missing
package is a clear error. The paper uses the Llama-2 tokenizer (32K pieces): point `data.tokenizer` at its
`tokenizer.model`, or at any SentencePiece model you trained (e.g. `spm_train --vocab_size=32000`).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Iterable

import numpy as np

from dblocks import files as files_lib
from dblocks import text as text_lib
from dblocks.data import ArraySource, DatasetMissingError

ENCODE_BATCH = 1000   # lines per SentencePiece encode call


class SentencePieceVocab:
    """A SentencePiece model behind the CharVocab interface (.size, .encode, .decode); id eos() ends a sentence."""

    def __init__(self, path: str):
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise DatasetMissingError("data.tokenizer is a SentencePiece model, but the `sentencepiece` package is not "
                                      "installed: pip install 'dblocks[text]' (or pip install sentencepiece)") from e
        if not os.path.exists(path):
            raise DatasetMissingError(f"data.tokenizer={path!r} does not exist: give the path of a SentencePiece "
                                      f"model file (e.g. Llama-2's tokenizer.model)")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)

    @property
    def size(self) -> int:
        return int(self.sp.get_piece_size())

    def eos(self) -> int:
        e = int(self.sp.eos_id())
        return e if e >= 0 else 0

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, from one SentencePiece call (its C++ loop, not one Python call per text)."""
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).ravel()])


def load_tokenizer(path: str) -> SentencePieceVocab:
    return SentencePieceVocab(path)


def train_tokenizer(name: str, vocab_size: int, workdir: str) -> str:
    """data.tokenizer=train:VOCAB: a SentencePiece model of vocab_size pieces trained on the non-empty lines of the
    train split of your own text, written to WORKDIR/tokenizer.model (kept: a resumed run reuses it). Its path."""
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        return path
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise DatasetMissingError("data.tokenizer=train:... trains a SentencePiece model, but the `sentencepiece` "
                                  "package is not installed: pip install 'dblocks[text]'") from e
    lines = [t for t in text_lib.user_text(name, "train").split("\n") if t.strip()]
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, f".tokenizer.{os.getpid()}")
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=tmp, vocab_size=vocab_size,
                                       minloglevel=2)
    except RuntimeError as e:   # e.g. a vocabulary larger than the text allows
        raise DatasetMissingError(f"data.tokenizer=train:{vocab_size} on the train split of {name}: {e}") from e
    os.replace(tmp + ".model", path)   # the .model alone is what loading needs
    os.remove(tmp + ".vocab")
    return path


def packed_tokens(name: str, split: str, vocab, data_dir: str = "", cache_dir: str | None = None) -> np.ndarray:
    """All sentences of a tfds text dataset, tokenized and joined with EOS: int32 [num_tokens]. Cached as .npy next
    to the tokenizer (first use tokenizes the whole split once, which takes minutes for LM1B's 30M sentences). The
    cache is written to a temporary name and renamed; an unreadable one is rebuilt."""
    key = hashlib.sha256(f"{name}|{split}|{getattr(vocab, 'path', '')}|{vocab.size}".encode()).hexdigest()[:12]
    cache_dir = cache_dir or os.path.dirname(os.path.abspath(getattr(vocab, "path", ".") or "."))
    path = os.path.join(cache_dir, f"{name}_{split}_{key}.npy")
    if os.path.exists(path):
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:   # damaged: tokenize again and replace it
            logging.getLogger("dblocks").warning("token cache %s is unreadable (%s); tokenizing again", path, e)
    import tensorflow_datasets as tfds
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:
        where = data_dir or "~/tensorflow_datasets"
        raise DatasetMissingError(
            f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}: {type(e).__name__}: {e}\n"
            f"Prepare it once, on a machine with TensorFlow, with:  pip install tensorflow tensorflow-datasets "
            f"&& tfds build {name} --data_dir {where} --file_format=array_record") from e
    texts = (ds[i]["text"] for i in range(len(ds)))
    tokens = encode_lines((t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts), vocab)
    try:
        files_lib.save_npy_atomic(path, tokens)   # tmp + rename: an interrupted write leaves no half cache
    except OSError:
        pass   # a read-only directory only costs the tokenization next time
    return tokens


def encode_lines(lines: Iterable[str], vocab, batch: int = ENCODE_BATCH) -> np.ndarray:
    """Every line's ids followed by EOS, joined: int32 [num_tokens]. Encoded `batch` lines per call when the vocab
    has encode_batch (SentencePieceVocab), else one line at a time."""
    eos = vocab.eos() if hasattr(vocab, "eos") else 0
    parts: list[np.ndarray] = []

    def flush(chunk: list[str]) -> None:
        ids = vocab.encode_batch(chunk) if hasattr(vocab, "encode_batch") else [vocab.encode(t) for t in chunk]
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        out = np.full(int(lens.sum()) + len(ids), eos, np.int32)   # EOS after each line's ids
        is_eos = np.zeros(len(out), bool)
        is_eos[np.cumsum(lens + 1) - 1] = True
        out[~is_eos] = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lens.sum()))
        parts.append(out)

    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == batch:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def user_source(name: str, split: str, seq_len: int, vocab) -> ArraySource:
    """Your own text (text:, jsonl:, hf:; split as dblocks.text splits it) tokenized with a SentencePiece model:
    each non-empty line, then EOS, packed into windows {'tokens': [num_windows, seq_len]}."""
    lines = [t for t in text_lib.user_text(name, split).split("\n") if t.strip()]
    tokens = encode_lines(lines, vocab)
    if len(tokens) < seq_len:
        raise DatasetMissingError(f"the {split} split of {name} has {len(tokens)} tokens, fewer than one sequence of "
                                  f"data.seq_len={seq_len}: add text or lower data.seq_len")
    return text_lib.sequence_source(tokens, seq_len)


# Datasets with no validation split of their own: the fraction of the train split's tokens (its tail) held out as
# 'validation' and never trained on. LM1B has only train and test, and settings must not be chosen on test.
HELD_OUT_FRACTION = {"lm1b": 0.01}


def split_tokens(tokens: np.ndarray, split: str, fraction: float) -> np.ndarray:
    """'train' -> the head of the train split's tokens, 'validation' -> its last `fraction` (at least one token)."""
    cut = len(tokens) - max(1, int(round(len(tokens) * fraction)))
    return tokens[:cut] if split == "train" else tokens[cut:]


def packed_source(name: str, split: str, seq_len: int, vocab, data_dir: str = "",
                  cache_dir: str | None = None) -> ArraySource:
    """Non-overlapping windows of seq_len tokens over the packed split: {'tokens': [num_windows, seq_len]}.
    For a dataset in HELD_OUT_FRACTION, 'validation' is a held-out tail of train (and 'train' excludes it)."""
    if name in HELD_OUT_FRACTION and split in ("train", "validation"):
        tokens = split_tokens(packed_tokens(name, "train", vocab, data_dir, cache_dir), split, HELD_OUT_FRACTION[name])
        if len(tokens) < seq_len:
            raise DatasetMissingError(f"{name}'s {split} slice has {len(tokens)} tokens, fewer than data.seq_len="
                                      f"{seq_len}")
    else:
        tokens = packed_tokens(name, split, vocab, data_dir, cache_dir)
    return text_lib.sequence_source(np.asarray(tokens), seq_len)
