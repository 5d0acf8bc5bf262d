"""Image data sources and the seeded, resumable batch order.

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
3 RGB); without train/test splits, a seeded fraction data.test_fraction (default 0.1) of each class is held out.
dblocks.user_data.resolve_fields fills data.num_classes / image_size / channels left at 0 from the data.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import os
from typing import Any, Protocol

import numpy as np

from dblocks.order import BATCH_ORDER, batch_indices  # noqa: F401  (the batch order, re-exported)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_DATASETS = ("fashion_mnist", "synthetic", "tfds:<name>", "folder:<path>", "npz:<path>", "hf:<name or path>")
USER_IMAGE_PREFIXES = ("folder:", "npz:", "hf:")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_FRACTION = 0.1   # held out when the data has no test split (seeded, per class)


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


def is_image_dataset(name: str) -> bool:
    """Whether config.data.name names an image dataset the image tasks (DiT, ViT) can read."""
    name = str(name)
    return name in ("fashion_mnist", "synthetic") or name.startswith(("tfds:",) + USER_IMAGE_PREFIXES)


def load_images(name: str, split: str, path: str = "", data_dir: str = "", size: int = 16, channels: int = 1,
                num_classes: int = 10, test_fraction: float = TEST_FRACTION, n: int = 512) -> Source:
    """The image source named by config.data.name. size / channels: what the user's images are made into
    (folder:, npz: and hf: data); num_classes / n: the synthetic data's."""
    if name == "fashion_mnist":
        return load_fashion_mnist(split, path or None)
    if name == "synthetic":
        return synthetic_images(split, num_classes=num_classes, size=size, channels=channels, n=n)
    if name.startswith("tfds:"):
        return TfdsSource(name[5:], split, data_dir)
    if name.startswith("folder:"):
        return FolderSource(name[7:], split, size, channels, test_fraction)
    if name.startswith("npz:"):
        return npz_images(name[4:], split, test_fraction)
    if name.startswith("hf:"):
        return HFImageSource(name[3:], split, size, channels, test_fraction)
    raise ValueError(f"unknown image dataset {name!r}; choose one of {IMAGE_DATASETS}")


# ---------------------------------------------------------------------------------------------------------------
# Your own images: folders of files, NumPy arrays, HuggingFace datasets
# ---------------------------------------------------------------------------------------------------------------

def heldout_split(labels: np.ndarray, split: str, fraction: float) -> np.ndarray:
    """Indices of `split` ('train' or 'test') when the data has no test split of its own: a seeded fraction of each
    class (at least one example of every class with two or more) is the test split. Seed 0, independent of the
    training seed, so every run of the same data tests on the same examples."""
    if split not in ("train", "test", "validation"):
        raise ValueError(f"image splits are 'train' and 'test', not {split!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(0)
    test = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        k = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 and fraction > 0 else 0
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    if split == "train":
        return np.setdiff1d(np.arange(len(labels)), test_idx)
    return test_idx


def fit_image(img, size: int, channels: int) -> np.ndarray:
    """A PIL image -> uint8 [size, size, channels]: converted to grey or RGB, center-cropped to a square, resized."""
    from PIL import Image, ImageOps
    if img.mode in ("I;16", "I", "F"):   # 16-bit / float greyscale: rescale to 8 bits
        a = np.asarray(img, np.float64)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12) * 255.0
        img = Image.fromarray(a.astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    if size and img.size != (size, size):
        img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    a = np.asarray(img, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _is_grey(img) -> bool:
    return img.mode in ("1", "L", "LA", "I", "I;16", "F")


class FolderSource:
    """Image files in class subfolders: ROOT/<class>/*.png (a seeded test fraction held out), or ROOT/train/<class>/
    and ROOT/test/<class>/. Class ids follow the sorted class-folder names of the train split. Files are decoded
    when a batch asks for them."""

    def __init__(self, root: str, split: str, size: int, channels: int, test_fraction: float = TEST_FRACTION):
        self.root, self.size, self.channels = os.path.expanduser(root), int(size), int(channels)
        files, labels, self.classes = folder_files(self.root, split, test_fraction)
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image
        images = []
        for i in np.asarray(indices).ravel():
            with Image.open(self.files[int(i)]) as img:
                images.append(fit_image(img, self.size, self.channels))
        return {"image": np.stack(images), "label": self.labels[np.asarray(indices)]}


def _class_files(root: str) -> dict[str, list[str]]:
    if not os.path.isdir(root):
        raise DatasetMissingError(f"image folder {root} does not exist")
    out = {}
    for c in sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")):
        files = sorted(f for f in glob.glob(os.path.join(root, c, "**", "*"), recursive=True)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if files:
            out[c] = files
    return out


@functools.lru_cache(maxsize=8)
def folder_files(root: str, split: str, test_fraction: float = TEST_FRACTION
                 ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """(files, int32 labels, class names) of one split of an image folder."""
    has_splits = os.path.isdir(os.path.join(root, "train"))
    train = _class_files(os.path.join(root, "train") if has_splits else root)
    if not train:
        raise DatasetMissingError(f"no images in {root}: expected one subfolder per class holding image files "
                                  f"({', '.join(IMAGE_EXTENSIONS)}), optionally under train/ and test/")
    classes = tuple(train)
    if has_splits:
        if split == "train":
            per_class = train
        else:
            test_root = next((os.path.join(root, s) for s in (split, "test", "validation", "val")
                              if os.path.isdir(os.path.join(root, s))), None)
            if test_root is None:
                raise DatasetMissingError(f"{root} has train/ but no {split}/ (or test/) folder")
            per_class = _class_files(test_root)
            unknown = sorted(set(per_class) - set(classes))
            if unknown:
                raise DatasetMissingError(f"{test_root} has classes {unknown} that {root}/train does not have")
        files = [f for c in per_class for f in per_class[c]]
        labels = np.asarray([classes.index(c) for c in per_class for _ in per_class[c]], np.int32)
        return files, labels, classes
    files = [f for c in classes for f in train[c]]
    labels = np.asarray([i for i, c in enumerate(classes) for _ in train[c]], np.int32)
    keep = heldout_split(labels, "test" if split != "train" else "train", test_fraction)
    return [files[i] for i in keep], labels[keep], classes


@functools.lru_cache(maxsize=4)
def _load_npz(path: str, mtime: float) -> dict[str, np.ndarray]:
    del mtime  # part of the cache key only: a rewritten file is read again
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def npz_arrays(path: str) -> dict[str, np.ndarray]:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DatasetMissingError(f"npz file {path} does not exist")
    return _load_npz(path, os.path.getmtime(path))


def npz_images(path: str, split: str, test_fraction: float = TEST_FRACTION) -> ArraySource:
    """An .npz of `image` [N, H, W, C] (or [N, H, W]) uint8 and `label` [N] (a seeded test fraction held out), or of
    `train_image`, `train_label`, `test_image`, `test_label` (and optionally `validation_*`)."""
    z = npz_arrays(path)
    if f"{split}_image" in z or "train_image" in z:
        key = split if f"{split}_image" in z else "test"
        if f"{key}_image" not in z or f"{key}_label" not in z:
            raise DatasetMissingError(f"{path} has arrays {sorted(z)}: split {split!r} needs {key}_image and "
                                      f"{key}_label")
        images, labels = z[f"{key}_image"], z[f"{key}_label"]
    elif "image" in z and "label" in z:
        keep = heldout_split(z["label"], split, test_fraction)
        images, labels = z["image"][keep], z["label"][keep]
    else:
        raise DatasetMissingError(f"{path} has arrays {sorted(z)}; expected 'image' and 'label', or "
                                  f"'train_image', 'train_label', 'test_image', 'test_label'")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise DatasetMissingError(f"{path}: images must be uint8 [N, H, W, C] with one label each; got "
                                  f"{images.dtype} {images.shape} and labels {labels.shape}")
    return ArraySource(image=images, label=np.asarray(labels).astype(np.int32))


# -- HuggingFace datasets (optional dependency; offline only) ----------------------------------------------------

@functools.lru_cache(maxsize=4)
def hf_dataset(spec: str) -> Any:
    """A HuggingFace dataset as a DatasetDict: `spec` is a folder written by `save_to_disk`, or NAME[:CONFIG] in the
    local cache. The load runs in HF offline mode (dblocks never downloads at run time); the mode is restored after
    it, so the rest of the process (a user's own datasets / hub calls) is not made offline."""
    try:
        import datasets
    except ImportError as e:
        raise DatasetMissingError("hf: data needs the HuggingFace `datasets` package: pip install datasets "
                                  "(or pip install -e '.[hf]')") from e
    with _hf_offline(datasets):
        path = os.path.expanduser(spec)
        try:
            if os.path.isdir(path):
                ds = datasets.load_from_disk(path)
            else:
                name, _, cfg = spec.partition(":")
                ds = datasets.load_dataset(name, cfg or None)
        except Exception as e:  # datasets raises several types for "not on disk / not cached"
            raise DatasetMissingError(
                f"HuggingFace dataset {spec!r} is neither a save_to_disk folder nor in the local cache "
                f"({type(e).__name__}: {e}). dblocks never downloads at run time: fetch it once with  python -c "
                f"\"import datasets; datasets.load_dataset('{spec.partition(':')[0]}').save_to_disk('DIR')\"  "
                f"and use hf:DIR") from e
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


@contextlib.contextmanager
def _hf_offline(datasets):
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE on (environment and the libraries' already-read copies) while inside;
    every one of them back as it was afterwards."""
    import huggingface_hub.constants as hub
    env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    flags = (datasets.config.HF_DATASETS_OFFLINE, datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        datasets.config.HF_DATASETS_OFFLINE, datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = flags


def open_hf(spec: str, split: str, test_fraction: float = TEST_FRACTION, stratify: str = "") -> Any:
    """One split of a HuggingFace dataset (see hf_dataset). A missing test split is the dataset's validation split,
    or else a seeded fraction of the train rows (per class of column `stratify`, when given) held out."""
    ds = hf_dataset(spec)
    if list(ds) == ["train"]:   # no held-out split of its own
        rows = ds["train"]
        labels = np.asarray(rows[stratify]) if stratify else np.zeros(len(rows), np.int64)
        return rows.select(heldout_split(labels, split, test_fraction).tolist())
    for s in (split, "test", "validation", "valid", "val") if split != "train" else ("train",):
        if s in ds:
            return ds[s]
    raise DatasetMissingError(f"HuggingFace dataset {spec!r} has splits {sorted(ds)}, no {split!r}")


def hf_image_columns(ds) -> tuple[str, str, int]:
    """(image column, label column, number of classes or 0 when unknown) of a HuggingFace image dataset."""
    import datasets
    feats = ds.features
    image = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    image = image or next((k for k in ("image", "img", "pixel_values") if k in feats), None)
    label = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((k for k in ("label", "labels", "fine_label") if k in feats), None)
    if image is None or label is None:
        raise DatasetMissingError(f"the HuggingFace dataset has columns {sorted(feats)}: need an image column "
                                  f"(datasets.Image) and a label column (ClassLabel or 'label')")
    f = feats[label]
    return image, label, int(f.num_classes) if isinstance(f, datasets.ClassLabel) else 0


class HFImageSource:
    """Random access into a HuggingFace image dataset (decoded, fitted to size x size x channels per batch)."""

    def __init__(self, spec: str, split: str, size: int, channels: int, test_fraction: float = TEST_FRACTION):
        train = open_hf(spec, "train")
        self.image_col, self.label_col, self.num_classes = hf_image_columns(train)
        self.ds = open_hf(spec, split, test_fraction, stratify=self.label_col)
        self.size, self.channels = int(size), int(channels)

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image
        rows = self.ds[[int(i) for i in np.asarray(indices).ravel()]]
        images = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
                  for im in rows[self.image_col]]
        return {"image": np.stack([fit_image(im, self.size, self.channels) for im in images]),
                "label": np.asarray(rows[self.label_col], np.int32)}


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (per-pixel std about 0.5, matching sigma_data)."""
    return images.astype(np.float32) / 127.5 - 1.0
