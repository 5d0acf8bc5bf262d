"""Image data sources and the seeded, resumable batch order.

A source is random-access: `len(src)` and `src.get(indices) -> dict of numpy arrays`. Batches are a pure function of
(seed, unit, step), so a block's data order does not depend on any other block, and a resumed run sees exactly the
batches the uninterrupted run would have seen.

Sources:
  fashion_mnist   IDX files of Debian's `dataset-fashion-mnist` (embedded default; no network)
  tfds:NAME       `tfds.data_source(NAME, data_dir=...)`: ArrayRecord datasets a user prepared; no TensorFlow needed
  synthetic       class-dependent patterns made from a seed, for fast tests
"""
from __future__ import annotations

import gzip
import os
from typing import Protocol

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_DATASETS = ("fashion_mnist", "synthetic", "tfds:<name>")


class DatasetMissingError(FileNotFoundError):
    """A dataset is not on disk; the message names the command that gets it."""


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


class TfdsSource:
    """Random access into a prepared tfds dataset through `tfds.data_source` (ArrayRecord, no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # imported here: tfds is slow to import and unused by the default data
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as e:  # tfds raises several types for "not prepared"
            where = data_dir or "~/tensorflow_datasets"
            raise DatasetMissingError(
                f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}: {type(e).__name__}: {e}\n"
                f"Prepare it once, on a machine with TensorFlow, with:  pip install tensorflow tensorflow-datasets "
                f"&& tfds build {name} --data_dir {where} --file_format=array_record") from e

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        keys = [int(i) for i in indices]
        try:
            items = self.ds.__getitems__(keys)  # one batched ArrayRecord read
        except (AttributeError, TypeError):    # sources without it (tfds' mock in 4.9 has a broken one)
            items = [self.ds[k] for k in keys]
        return {k: np.stack([np.asarray(it[k]) for it in items]) for k in items[0]}


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# ---------------------------------------------------------------------------------------------------------------

def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, path: str | None = None) -> ArraySource:
    """Fashion-MNIST as uint8 images [N, 28, 28, 1] and int32 labels [N]; split 'train' (60k) or 'test' (10k)."""
    path = path or os.environ.get("DBLOCKS_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    files = [os.path.join(path, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
    files = [f + ".gz" if not os.path.exists(f) else f for f in files]
    for f in files:
        if not os.path.exists(f):
            raise DatasetMissingError(f"Fashion-MNIST not found: {f} is missing. Install it with "
                                      f"`apt-get install dataset-fashion-mnist` (or `./launch.sh setup`), or point "
                                      f"config.data.path / DBLOCKS_FASHION_MNIST_DIR at the IDX files")
    images, labels = (_read_idx(f) for f in files)
    return ArraySource(image=images[..., None], label=labels.astype(np.int32))


def synthetic_images(split: str, num_classes: int = 10, size: int = 16, channels: int = 1,
                     n: int = 512) -> ArraySource:
    """Class-dependent images (a bright bar whose position encodes the class, plus noise), for fast tests."""
    rng = np.random.default_rng({"train": 0, "test": 1}.get(split, 2))
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.normal(60, 20, (n, size, size, channels))
    rows = (labels * size) // num_classes
    for i, r in enumerate(rows):
        images[i, r: r + max(1, size // num_classes)] += 150
    return ArraySource(image=np.clip(images, 0, 255).astype(np.uint8), label=labels)


def load_images(name: str, split: str, path: str = "", data_dir: str = "", **synthetic_kw) -> Source:
    """The image source named by config.data.name."""
    if name == "fashion_mnist":
        return load_fashion_mnist(split, path or None)
    if name == "synthetic":
        return synthetic_images(split, **synthetic_kw)
    if name.startswith("tfds:"):
        return TfdsSource(name[5:], split, data_dir)
    raise ValueError(f"unknown image dataset {name!r}; choose one of {IMAGE_DATASETS}")


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (per-pixel std about 0.5, matching sigma_data)."""
    return images.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Seeded, resumable batch order
# ---------------------------------------------------------------------------------------------------------------

def batch_indices(num_examples: int, batch_size: int, seed: int, unit: int, step: int) -> np.ndarray:
    """Indices of the batch a unit (block) trains on at `step`: epochs of seeded permutations, a pure function of
    its arguments (so runs resume exactly and blocks' orders are independent)."""
    if batch_size > num_examples:
        raise ValueError(f"batch size {batch_size} exceeds the {num_examples} examples of the dataset")
    per_epoch = num_examples // batch_size  # drop the remainder: every batch is full
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, unit, epoch]).permutation(num_examples)
    return np.sort(perm[i * batch_size:(i + 1) * batch_size])
