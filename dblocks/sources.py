"""Random-access data sources, and the train / validation / test splits of data that lacks some of its own.

A source is random-access: `len(src)` and `src.get(indices) -> dict of numpy arrays`. Held-out splits are seeded
per-class fractions (heldout_split), and labels are checked to be class ids 0..K-1 (check_labels, check_class_ids):
see docs/data.md, "Splits" and "What is checked before training".
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from dblocks.data_errors import DataError

USER_IMAGE_PREFIXES = ("folder:", "npz:", "hf:")
TEST_FRACTION = 0.1   # held out when the data has no test split (seeded, per class)
VAL_FRACTION = 0.1    # of the rest, held out as validation when your own data has no validation split
SPLITS = ("train", "validation", "test")


class Source(Protocol):
    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArraySource:
    """An in-memory source over equal-length arrays."""

    def __init__(self, **arrays: np.ndarray):
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays of different lengths: { {k: len(v) for k, v in arrays.items()} }")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.arrays.items()}




def default_val_fraction(name: str) -> float:
    """data.val_fraction when the config has none: VAL_FRACTION for your own images, 0 for the built-in datasets
    (the paper trains on their whole train split; their validation split must be asked for)."""
    return VAL_FRACTION if str(name).startswith(USER_IMAGE_PREFIXES) else 0.0


def split_fractions(data) -> tuple[float, float]:
    """(test_fraction, val_fraction) of a config's data section; a field that is missing or None takes its default
    (TEST_FRACTION; default_val_fraction of the dataset)."""
    test, val = data.get("test_fraction", None), data.get("val_fraction", None)
    return (TEST_FRACTION if test is None else float(test),
            default_val_fraction(str(data.get("name", ""))) if val is None else float(val))


def _pick(labels: np.ndarray, pool: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded `fraction` of each class of labels[pool] (at least one of every class with two or more)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels[pool]):
        idx = pool[labels[pool] == c]
        k = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 and fraction > 0 else 0
        out.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def heldout_split(labels: np.ndarray, split: str, test_fraction: float, val_fraction: float = 0.0,
                  where: str = "the data") -> np.ndarray:
    """Indices of `split` ('train', 'validation' or 'test') of data with no held-out splits of its own: a seeded
    test_fraction of each class is the test split (seed 0, independent of the training seed, so every run of the
    same data tests on the same examples), then a seeded val_fraction of each class of the rest is the validation
    split (seed 1), and the remainder is train. Asking for a split whose fraction is 0 is a DataError."""
    if split not in SPLITS:
        raise ValueError(f"splits are {SPLITS}, not {split!r}")
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    test = _pick(labels, everything, test_fraction, 0)
    if split == "test":
        if test_fraction <= 0:
            raise DataError(f"{where} has no test split of its own and data.test_fraction=0")
        return test
    rest = np.setdiff1d(everything, test)
    val = _pick(labels, rest, val_fraction, 1)
    if split == "validation":
        if val_fraction <= 0:
            raise DataError(f"{where} has no validation split of its own and data.val_fraction=0: train with "
                            f"--config.data.val_fraction=0.1 (a seeded tenth of train is then held out for choosing "
                            f"settings), or evaluate on split 'test' for a final figure, choosing nothing by it")
        return val
    return np.setdiff1d(rest, val)


def split_rows(split: str, own: set[str] | frozenset, train_labels: np.ndarray, test_fraction: float,
               val_fraction: float, where: str) -> tuple[str, np.ndarray | None]:
    """Where `split` comes from: (the data's own split, None) when it has it, else ('train', indices into its
    train split), the missing held-out splits carved from train by heldout_split (so train never holds them)."""
    if split not in SPLITS:
        raise ValueError(f"splits are {SPLITS}, not {split!r}")
    if split in own and (split != "train" or {"test", "validation"} <= set(own)):
        return split, None
    return "train", heldout_split(train_labels, split, 0.0 if "test" in own else test_fraction,
                                  0.0 if "validation" in own else val_fraction, where)


def check_label_format(shape: tuple[int, ...], dtype, where: str) -> None:
    """DataError unless labels of this shape and dtype are class ids [N] (not one-hot, not floats)."""
    if len(shape) != 1:
        hint = " (one-hot or scores? store class ids: labels.argmax(1))" if len(shape) == 2 else ""
        raise DataError(f"{where}: labels must be class ids of shape [N]; got shape {list(shape)}{hint}")
    if np.dtype(dtype).kind not in "iu":
        raise DataError(f"{where}: labels must be integer class ids 0..K-1; got dtype {np.dtype(dtype)}")


def check_labels(labels, where: str) -> np.ndarray:
    """Class ids as int32 [N]; DataError for anything else (one-hot or float labels, negative ids)."""
    labels = np.asarray(labels)
    check_label_format(labels.shape, labels.dtype, where)
    if len(labels) and labels.min() < 0:
        i = int(np.argmin(labels))
        raise DataError(f"{where}: label {int(labels[i])} at index {i}: class ids are 0..K-1 (unlabelled examples "
                        f"must be removed: a negative id is not a class)")
    return labels.astype(np.int32)


def check_class_ids(labels: np.ndarray, where: str) -> int:
    """The number of classes, max id + 1, when every id 0..max has an example; else a DataError (a stray large id
    would size the label table and add classes that never train)."""
    ids = np.unique(np.asarray(labels))
    k = int(ids[-1]) + 1 if len(ids) else 0
    if len(ids) < k:
        missing = np.setdiff1d(np.arange(k), ids)
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{where}: labels use {len(ids)} class ids but the largest is {k - 1}; ids {shown} "
                        f"({len(missing)} of them) have no example. Number the classes 0..K-1 without gaps "
                        f"(np.unique(labels, return_inverse=True)[1])")
    return k


HF_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def hf_own_splits(ds) -> dict[str, str]:
    """{split: the dataset's own split of that role} for the splits it has (e.g. {'train': 'train', 'validation':
    'dev'})."""
    return {s: next(n for n in names if n in ds) for s, names in HF_SPLIT_NAMES.items() if any(n in ds for n in names)}
