"""Your own images as sources: folders of image files, NumPy .npz arrays, HuggingFace datasets (offline only).

Each is checked whole when opened (dblocks.sources for splits and labels, dblocks.files for limits and decoders):
folders by walking every class folder once and reading every image header, .npz files from their array headers.
Images are decoded per batch and fitted to data.image_size x data.image_size x data.channels; one that fails to
decode is replaced by the next one of its split (DecodedImages).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Any

import numpy as np

from dblocks import files as files_lib
from dblocks.data_errors import DataError, DatasetMissingError
from dblocks.sources import (SPLITS, TEST_FRACTION, VAL_FRACTION, ArraySource, check_label_format, check_labels,
                             hf_own_splits, split_rows)

log = logging.getLogger("dblocks")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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


def is_grey_mode(mode: str) -> bool:
    return mode in ("1", "L", "LA", "I", "I;16", "F")


def _warn_skipped(where: str, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        shown = "; ".join(f"{f} ({why})" for f, why in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d file(s): %s", where, len(skipped), shown)


class DecodedImages:
    """Base of the sources that decode image files per batch. An image that fails to decode (a damaged file the
    header check let through) is replaced by the next decodable image of the split, with its label, and a warning
    that names the file: the same replacement on every run and resume, so a bad file costs one example, never the
    run. `replaced` holds the indices replaced so far."""
    where = "images"

    def __init__(self, labels: np.ndarray, size: int, channels: int):
        self.labels, self.size, self.channels = labels, int(size), int(channels)
        self.replaced: set[int] = set()

    def __len__(self) -> int:
        return len(self.labels)

    def open_image(self, i: int):
        raise NotImplementedError

    def _name(self, i: int) -> str:
        raise NotImplementedError

    def _decode(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            if j in self.replaced:
                continue
            try:
                with self.open_image(j) as img:
                    return fit_image(img, self.size, self.channels), j
            except files_lib.decode_errors() as e:
                self.replaced.add(j)
                log.warning("%s: cannot decode %s (%s: %s); the next image of the split is used in its place "
                            "(%d replaced so far)", self.where, self._name(j), type(e).__name__, e,
                            len(self.replaced))
        raise DataError(f"{self.where}: none of the {n} images of this split can be decoded")

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        pairs = [self._decode(int(i)) for i in np.asarray(indices).ravel()]
        return {"image": np.stack([a for a, _ in pairs]),
                "label": np.asarray([self.labels[j] for _, j in pairs], np.int32)}


class FolderSource(DecodedImages):
    """Image files in class subfolders: ROOT/<class>/*.png, or ROOT/train/<class>/ (and test/, validation/ or val/
    when present; missing held-out splits are carved from train); images directly in ROOT (or ROOT/train/) are one
    class named after ROOT. Class ids follow the sorted class-folder names of the train split. Files are decoded when a
    batch asks for them (see DecodedImages)."""

    def __init__(self, root: str, split: str, size: int, channels: int, test_fraction: float = TEST_FRACTION,
                 val_fraction: float = VAL_FRACTION):
        self.root = os.path.expanduser(root)
        self.where = f"folder:{self.root}"
        self.files, labels, self.classes = folder_files(self.root, split, test_fraction, val_fraction)
        super().__init__(labels, size, channels)

    def open_image(self, i: int):
        return files_lib.open_image(self.files[i])

    def _name(self, i: int) -> str:
        return self.files[i]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_images(top: str, other_roots: list[str], seen_dirs: set, seen_files: set,
                 skipped: list[tuple[str, str]]) -> list[str]:
    """Image files under `top`, sorted, following symbolic links once: a directory or file reached again by its
    real path (a link loop, a second link to it) is skipped, and so is a link into another class's folder (its
    images belong to that class)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if d.startswith("."):
                continue
            if any(_inside(real, r) for r in other_roots):
                skipped.append((os.path.join(dirpath, d), "a link into another class's folder"))
                continue
            if real in seen_dirs:
                skipped.append((os.path.join(dirpath, d), "a folder already read (a link loop or a second link)"))
                continue
            seen_dirs.add(real)
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not f.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, f)
            real = os.path.realpath(path)
            if real in seen_files:
                skipped.append((path, "the same file as one read before"))
            elif any(_inside(real, r) for r in other_roots):
                skipped.append((path, "a link into another class's folder"))
            else:
                seen_files.add(real)
                out.append(path)
    return sorted(out)


def _read_header(path: str) -> tuple[tuple[int, int], str] | str:
    """(size, mode) of an image file from its header, or why it cannot be read."""
    try:
        with files_lib.open_image(path) as img:
            return img.size, img.mode
    except files_lib.decode_errors() as e:
        return f"{type(e).__name__}: {e}"


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """An image folder read once: its class names, and per stored split (train, and test / validation when it has
    folders for them) the readable files, their labels and their (size, mode)."""
    classes: tuple[str, ...]
    splits: dict[str, tuple[list[str], np.ndarray]]
    headers: dict[str, tuple[tuple[int, int], str]]
    skipped: tuple[tuple[str, str], ...]


HELD_OUT_DIRS = {"test": ("test",), "validation": ("validation", "val")}


@functools.lru_cache(maxsize=4)
def scan_folder(root: str) -> FolderScan:
    """Every class folder of `root` walked once (symbolic links followed once), and the header of every image file
    read: files that are not images of IMAGE_FORMATS, damaged headers, repeats and links into another class are
    skipped and counted, with one warning. DataError when nothing usable is left."""
    if not os.path.isdir(root):
        raise DatasetMissingError(f"image folder {root} does not exist")
    has_splits = os.path.isdir(os.path.join(root, "train"))
    stored = {"train": os.path.join(root, "train") if has_splits else root}
    if has_splits:
        for split, names in HELD_OUT_DIRS.items():
            d = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
            if d:
                stored[split] = d

    def class_dirs(top: str) -> list[str]:
        """The class folders of `top`; [''] (top itself, one class) when it holds images and no folders."""
        try:
            entries = [e for e in os.scandir(top) if not e.name.startswith(".")]
            dirs = sorted(e.name for e in entries if e.is_dir())
            loose = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        except OSError as e:
            raise files_lib.cannot_read(top, e) from e
        if dirs and loose:
            raise DataError(f"{top} mixes class folders {dirs[:3]} with loose images {loose[:3]}: put every image "
                            f"in a class folder, or (one class, e.g. for unconditional generation) none of them")
        return dirs or ([""] if loose else [])

    seen_files: set = set()
    skipped: list[tuple[str, str]] = []
    per_split: dict[str, dict[str, list[str]]] = {}
    for split, top in stored.items():   # train first: a file also under test/ stays in train only
        names = class_dirs(top)
        roots = {c: os.path.realpath(os.path.join(top, c)) for c in names}
        seen_dirs = set(roots.values())
        per_split[split] = {c: _walk_images(os.path.join(top, c), [r for k, r in roots.items() if k != c],
                                            seen_dirs, seen_files, skipped) for c in names}
    headers = {}
    for split in per_split:
        for c, files in per_split[split].items():
            ok = []
            for f in files:
                h = _read_header(f)
                if isinstance(h, str):
                    skipped.append((f, h))
                else:
                    headers[f] = h
                    ok.append(f)
            per_split[split][c] = ok
    flat = os.path.basename(os.path.realpath(root).rstrip(os.sep)) or "images"   # the one class of a flat folder
    per_split = {split: {c or flat: fs for c, fs in by_class.items()} for split, by_class in per_split.items()}
    classes = tuple(c for c, fs in per_split["train"].items() if fs)
    if not classes:
        raise DatasetMissingError(f"no images in {root}: expected image files ({', '.join(IMAGE_EXTENSIONS)}) "
                                  f"in one subfolder per class, or directly in it (one class), optionally under "
                                  f"train/ and test/")
    splits = {}
    for split, by_class in per_split.items():
        unknown = sorted(c for c, fs in by_class.items() if fs and c not in classes)
        if unknown:
            raise DataError(f"{stored[split]} has classes {unknown} that {stored['train']} does not have")
        files = [f for c in classes for f in by_class.get(c, [])]
        splits[split] = (files, np.asarray([i for i, c in enumerate(classes) for _ in by_class.get(c, [])],
                                           np.int32))
    _warn_skipped(f"folder:{root}", skipped)
    return FolderScan(classes, splits, headers, tuple(skipped))


@functools.lru_cache(maxsize=8)
def folder_files(root: str, split: str, test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION
                 ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """(files, int32 labels, class names) of one split of an image folder."""
    scan = scan_folder(root)
    files, labels = scan.splits["train"]
    stored, keep = split_rows(split, set(scan.splits), labels, test_fraction, val_fraction, f"folder:{root}")
    files, labels = scan.splits[stored]
    if keep is not None:
        files, labels = [files[i] for i in keep], labels[keep]
    return files, labels, scan.classes


# -- NumPy arrays --------------------------------------------------------------------------------------------------

def npz_layout(path: str) -> dict[str, tuple[str, str]]:
    """{stored split: (image array name, label array name)} of an .npz, checked from the array headers before
    anything is loaded: uint8 images [N, H, W] or [N, H, W, C], one integer label per image, the same image shape in
    every split. DataError otherwise."""
    head = files_lib.npz_header(path)
    if "train_image" in head:
        layout = {s: (f"{s}_image", f"{s}_label") for s in SPLITS if f"{s}_image" in head or f"{s}_label" in head}
    elif "image" in head:
        layout = {"": ("image", "label")}
    else:
        raise DataError(f"{path} has arrays {sorted(head)}; expected 'image' and 'label', or 'train_image', "
                        f"'train_label', 'test_image', 'test_label' (and optionally 'validation_*')")
    shapes = set()
    for image, label in layout.values():
        for k in (image, label):
            if k not in head:
                raise DataError(f"{path} has arrays {sorted(head)}: {image} needs {label} beside it (and back)")
        (ishape, idtype), (lshape, ldtype) = head[image], head[label]
        if idtype != np.uint8 or len(ishape) not in (3, 4):
            raise DataError(f"{path}: {image} must be uint8 [N, H, W, C] or [N, H, W]; got {idtype} {list(ishape)}")
        check_label_format(lshape, ldtype, f"{path}: {label}")
        if lshape[0] != ishape[0]:
            raise DataError(f"{path}: {image} has {ishape[0]} images but {label} has {lshape[0]} labels: one label "
                            f"per image")
        shapes.add((tuple(ishape[1:3]), ishape[3] if len(ishape) == 4 else 1))
    if len(shapes) > 1:
        raise DataError(f"{path}: the splits' images differ in size or channels {sorted(shapes)}")
    return layout


def npz_images(path: str, split: str, test_fraction: float = TEST_FRACTION,
               val_fraction: float = VAL_FRACTION) -> ArraySource:
    """An .npz of `image` [N, H, W, C] (or [N, H, W]) uint8 and `label` [N] (the test and validation splits are
    seeded fractions held out), or of `train_image`, `train_label`, `test_image`, `test_label` (and optionally
    `validation_*`; missing held-out splits are carved from train). Checked whole before use (npz_layout,
    check_labels)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DatasetMissingError(f"npz file {path} does not exist")
    layout = npz_layout(path)
    own = {s for s in layout if s}
    train_key = "train" if own else ""
    train_labels = check_labels(files_lib.npz_array(path, layout[train_key][1]), f"{path}: {layout[train_key][1]}")
    stored, keep = split_rows(split, own, train_labels, test_fraction, val_fraction, f"npz:{path}")
    image_key, label_key = layout[stored if own else ""]
    images = files_lib.npz_array(path, image_key)
    labels = check_labels(files_lib.npz_array(path, label_key), f"{path}: {label_key}")
    if keep is not None:
        images, labels = images[keep], labels[keep]
    return ArraySource(image=images if images.ndim == 4 else images[..., None], label=labels)


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


def open_hf(spec: str, split: str, test_fraction: float = TEST_FRACTION, stratify: str = "",
            val_fraction: float = VAL_FRACTION) -> Any:
    """One split of a HuggingFace dataset (see hf_dataset): its own split of that role, or, when it has none, a
    seeded fraction of its train rows (per class of column `stratify`, when given; train then excludes them)."""
    ds = hf_dataset(spec)
    own = hf_own_splits(ds)
    rows = hf_train_rows(spec)
    labels = np.asarray(rows[stratify]) if stratify else np.zeros(len(rows), np.int64)
    stored, keep = split_rows(split, set(own), labels, test_fraction, val_fraction, f"hf:{spec}")
    return ds[own[stored]] if keep is None else rows.select(keep.tolist())


def hf_train_rows(spec: str) -> Any:
    """The whole stored train split of a HuggingFace dataset (before any held-out split is carved from it)."""
    ds = hf_dataset(spec)
    own = hf_own_splits(ds)
    if "train" not in own:
        raise DataError(f"HuggingFace dataset {spec!r} has splits {sorted(ds)}, no 'train'")
    return ds[own["train"]]


def hf_image_columns(ds) -> tuple[str, str, int]:
    """(image column, label column, number of classes or 0 when unknown) of a HuggingFace image dataset."""
    import datasets
    feats = ds.features
    image = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    image = image or next((k for k in ("image", "img", "pixel_values") if k in feats), None)
    label = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((k for k in ("label", "labels", "fine_label") if k in feats), None)
    if image is None or label is None:
        raise DataError(f"the HuggingFace dataset has columns {sorted(feats)}: need an image column "
                        f"(datasets.Image) and a label column (ClassLabel or 'label')")
    f = feats[label]
    return image, label, int(f.num_classes) if isinstance(f, datasets.ClassLabel) else 0


class HFImageSource(DecodedImages):
    """Random access into a HuggingFace image dataset: its labels checked whole when opened (check_labels), images
    decoded by dblocks (IMAGE_FORMATS only) and fitted to size x size x channels per batch (see DecodedImages)."""

    def __init__(self, spec: str, split: str, size: int, channels: int, test_fraction: float = TEST_FRACTION,
                 val_fraction: float = VAL_FRACTION):
        import datasets
        self.image_col, self.label_col, self.num_classes = hf_image_columns(hf_train_rows(spec))
        ds = open_hf(spec, split, test_fraction, stratify=self.label_col, val_fraction=val_fraction)
        if isinstance(ds.features[self.image_col], datasets.Image):   # bytes / paths: decoded by open_image
            ds = ds.cast_column(self.image_col, datasets.Image(decode=False))
        self.ds, self.where = ds, f"hf:{spec} ({split})"
        super().__init__(check_labels(ds[self.label_col], self.where), size, channels)

    def open_image(self, i: int):
        import io
        from PIL import Image
        im = self.ds[i][self.image_col]
        if isinstance(im, dict):   # datasets.Image(decode=False): {'bytes': ..., 'path': ...}
            return files_lib.open_image(io.BytesIO(im["bytes"]) if im.get("bytes") else im["path"])
        return Image.fromarray(np.asarray(im, np.uint8))

    def _name(self, i: int) -> str:
        return f"row {i}"
