"""Image data sources and the seeded, resumable batch order (your own images: dblocks.user_images; splits and label
checks: dblocks.sources).

A source is random-access: `len(src)` and `src.get(indices) -> dict of numpy arrays`. Batches are a pure function of
(seed, unit, step), so a block's data order does not depend on any other block, and a resumed run sees exactly the
batches the uninterrupted run would have seen.

Sources (config.data.name):
  fashion_mnist   IDX files of Debian's `dataset-fashion-mnist` (embedded default; no network)
  tfds:NAME       `tfds.data_source(NAME, data_dir=...)`: ArrayRecord datasets a user prepared; no TensorFlow needed
  folder:PATH     your images, one subfolder per class (PATH/train/<class>/ and PATH/test/<class>/ when present)
  npz:PATH        your arrays: `image` [N, H, W, C] uint8 + `label` [N], or `train_image` / `test_image` / ...
  hf:NAME_OR_PATH a HuggingFace `datasets` dataset saved with `save_to_disk`, or in the local cache (never the network)
  synthetic       class-dependent patterns made from a seed, for fast tests

Your own images are center-cropped to a square and resized to data.image_size, converted to data.channels (1 grey,
3 RGB); without test / validation splits of its own, seeded fractions of each class are held out: data.test_fraction
(default 0.1) for test, then data.val_fraction (default 0.1) of the rest for validation. The built-in datasets train
on their whole train split unless data.val_fraction > 0. Every source is checked whole before training (array
headers, lengths, label ids and dtypes, image headers; dblocks.files holds the size limits); an image that still fails
to decode is replaced by the next one of its split, with a warning. Bad data is a DataError (exit status 2).
dblocks.user_data.resolve_fields fills data.num_classes / image_size / channels left at 0 from the data.
"""
from __future__ import annotations

import gzip
import os

import numpy as np

from dblocks import files as files_lib
from dblocks.data_errors import DataError, DatasetMissingError  # noqa: F401  (re-exported: the data's user errors)
from dblocks.order import BATCH_ORDER, batch_indices  # noqa: F401  (the batch order, re-exported)
# re-exported: the splits and sources of dblocks.sources and dblocks.user_images are reached as dblocks.data.<name>
from dblocks.sources import (SPLITS, TEST_FRACTION, USER_IMAGE_PREFIXES, VAL_FRACTION, ArraySource,  # noqa: F401
                             Source, check_class_ids, check_label_format, check_labels, default_val_fraction,
                             heldout_split, split_fractions, split_rows)
from dblocks.user_images import (IMAGE_EXTENSIONS, DecodedImages, FolderScan, FolderSource,  # noqa: F401
                                 HFImageSource, fit_image, folder_files, hf_dataset, hf_image_columns,
                                 hf_own_splits, hf_train_rows, is_grey_mode, npz_images, npz_layout, open_hf,
                                 scan_folder)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_DATASETS = ("fashion_mnist", "synthetic", "tfds:<name>", "folder:<path>", "npz:<path>", "hf:<name or path>")


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
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except OSError as e:
        raise files_lib.cannot_read(path, e) from e
    except (ValueError, IndexError, EOFError) as e:   # truncated or not an IDX file
        raise DataError(f"{path} is not a complete IDX file ({type(e).__name__}: {e}): download it again") from e


def load_fashion_mnist(split: str, path: str | None = None, val_fraction: float = 0.0) -> ArraySource:
    """Fashion-MNIST as uint8 images [N, 28, 28, 1] and int32 labels [N]; split 'train' (60k), 'test' (10k) or
    'validation' (a seeded val_fraction of each class of train, which 'train' then excludes; none when 0)."""
    path = path or os.environ.get("DBLOCKS_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST splits are {SPLITS}, not {split!r}")
    prefix = "t10k" if split == "test" else "train"
    files = [os.path.join(path, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
    files = [f + ".gz" if not os.path.exists(f) else f for f in files]
    for f in files:
        if not os.path.exists(f):
            raise DatasetMissingError(f"Fashion-MNIST not found: {f} is missing. Install it with "
                                      f"`apt-get install dataset-fashion-mnist` (or `./launch.sh setup`), or point "
                                      f"config.data.path / DBLOCKS_FASHION_MNIST_DIR at the IDX files")
    images, labels = (_read_idx(f) for f in files)
    if len(images) != len(labels):
        raise DataError(f"{files[0]} has {len(images)} images but {files[1]} has {len(labels)} labels")
    labels = labels.astype(np.int32)
    if split != "test" and (split == "validation" or val_fraction > 0):
        keep = heldout_split(labels, split, 0.0, val_fraction, "fashion_mnist")
        images, labels = images[keep], labels[keep]
    return ArraySource(image=images[..., None], label=labels)


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


def is_image_dataset(name: str) -> bool:
    """Whether config.data.name names an image dataset the image tasks (DiT, ViT) can read."""
    name = str(name)
    return name in ("fashion_mnist", "synthetic") or name.startswith(("tfds:",) + USER_IMAGE_PREFIXES)


def load_images(name: str, split: str, path: str = "", data_dir: str = "", size: int = 16, channels: int = 1,
                num_classes: int = 10, test_fraction: float = TEST_FRACTION, n: int = 512,
                val_fraction: float | None = None) -> Source:
    """The image source named by config.data.name. size / channels: what the user's images are made into
    (folder:, npz: and hf: data); num_classes / n: the synthetic data's; test_fraction / val_fraction: the held-out
    shares of data without such splits of its own (val_fraction None: default_val_fraction(name))."""
    val_fraction = default_val_fraction(name) if val_fraction is None else float(val_fraction)
    if name == "fashion_mnist":
        return load_fashion_mnist(split, path or None, val_fraction)
    if name == "synthetic":
        return synthetic_images(split, num_classes=num_classes, size=size, channels=channels, n=n)
    if name.startswith("tfds:"):
        return TfdsSource(name[5:], split, data_dir)
    if name.startswith("folder:"):
        return FolderSource(name[7:], split, size, channels, test_fraction, val_fraction)
    if name.startswith("npz:"):
        return npz_images(name[4:], split, test_fraction, val_fraction)
    if name.startswith("hf:"):
        return HFImageSource(name[3:], split, size, channels, test_fraction, val_fraction)
    raise ValueError(f"unknown image dataset {name!r}; choose one of {IMAGE_DATASETS}")


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (per-pixel std about 0.5, matching sigma_data)."""
    return images.astype(np.float32) / 127.5 - 1.0
