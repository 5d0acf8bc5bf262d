"""Your own data: the config fields a dataset decides (classes, image size, channels, the character vocabulary),
filled in from the data before validation, and a clear error, before anything trains, when data and config disagree.

  from dblocks.user_data import resolve_fields
  resolve_fields(config, workdir)   # the training dispatcher and assembly call this before config validation

Image data (folder:, npz:, hf:; see dblocks.data): data.num_classes, data.image_size and data.channels left at 0 are
taken from the data (the class folders or the largest label, every id below it used; the first image's shorter side;
grey when every image looked at is grey, else RGB). Set ones must agree: folder and hf images are resized and
converted to what the config says, npz arrays are used as they are, so their size and channels must match.

Text data (text:, jsonl:, hf:; see dblocks.text): data.vocab is set to the characters of the train split, or kept
from the run's WORKDIR/config.json, so a resumed run, its evaluation and its samples use the same vocabulary.
"""
from __future__ import annotations

import json
import os

import numpy as np

from dblocks import data as data_lib
from dblocks import files as files_lib
from dblocks import text as text_lib
from dblocks import tokenized
from dblocks.config import ConfigError

IMAGE_FIELDS = ("num_classes", "image_size", "channels")
PEEK = 16   # hf: images opened to decide grey vs RGB (a folder's every image header is read)


def is_user_dataset(name: str) -> bool:
    return str(name).startswith(data_lib.USER_IMAGE_PREFIXES + text_lib.USER_TEXT_PREFIXES)


def _is_image_task(config) -> bool:
    return "image_size" in config.data or config.get("task") in ("dit", "vit")


def image_info(name: str, test_fraction: float = data_lib.TEST_FRACTION,
               val_fraction: float = data_lib.VAL_FRACTION) -> dict:
    """{'num_classes', 'image_size', 'channels', 'class_names', 'exact'} of a user image dataset; exact: whether
    image_size and channels are the data's as stored (npz) rather than what it is converted to (folder, hf).
    The whole dataset is checked on the way (dblocks.data: array headers, lengths, label ids; every image header of
    a folder); a problem is a DataError naming the file."""
    kind, _, spec = name.partition(":")
    if kind == "npz":
        path = os.path.expanduser(spec)
        src = data_lib.npz_images(path, "train", test_fraction, val_fraction)
        layout = data_lib.npz_layout(path)
        labels = np.concatenate([data_lib.check_labels(files_lib.npz_array(path, lab), f"{path}: {lab}")
                                 for _, lab in layout.values()])
        img = src.arrays["image"]
        if img.shape[1] != img.shape[2]:
            raise ConfigError(f"{name}: images are {img.shape[1]}x{img.shape[2]}; the image tasks need square "
                              f"images (crop or pad the arrays)")
        return {"num_classes": data_lib.check_class_ids(labels, name), "image_size": int(img.shape[1]),
                "channels": int(img.shape[3]), "class_names": "", "exact": True}
    if kind == "folder":
        scan = data_lib.scan_folder(os.path.expanduser(spec))
        files = scan.splits["train"][0]
        data_lib.folder_files(os.path.expanduser(spec), "train", test_fraction, val_fraction)   # splits exist
        sizes_modes = [scan.headers[f] for f in files]
        names = ",".join(scan.classes)
        num_classes = len(scan.classes)
    elif kind == "hf":
        stored = data_lib.hf_dataset(spec)
        ds = data_lib.hf_train_rows(spec)
        image_col, label_col, num_classes = data_lib.hf_image_columns(ds)
        labels = np.concatenate([data_lib.check_labels(stored[s][label_col], f"{name} ({s})")
                                 for s in data_lib.hf_own_splits(stored).values()])
        if num_classes and len(labels) and labels.max() >= num_classes:
            raise data_lib.DataError(f"{name}: label {int(labels.max())} but the ClassLabel column {label_col!r} "
                                     f"has {num_classes} classes")
        num_classes = num_classes or data_lib.check_class_ids(labels, name)
        feat = ds.features[label_col]
        names = ",".join(getattr(feat, "names", None) or [])
        src = data_lib.HFImageSource(spec, "train", 0, 3, test_fraction, val_fraction)
        sizes_modes = []
        for i in np.linspace(0, len(src) - 1, min(PEEK, len(src))).astype(int):
            with src.open_image(int(i)) as im:
                sizes_modes.append((im.size, im.mode))
    else:
        raise ValueError(f"{name!r} is not a user image dataset (folder:, npz:, hf:)")
    return {"num_classes": int(num_classes), "image_size": int(min(sizes_modes[0][0])),
            "channels": 1 if all(data_lib.is_grey_mode(m) for _, m in sizes_modes) else 3, "class_names": names,
            "exact": False}


def _saved_config(workdir: str | None) -> dict:
    path = os.path.join(workdir, "config.json") if workdir else ""
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def resolve_fields(config, workdir: str | None = None, read_data: bool = True, train_tokenizer: bool = True):
    """Fills the data-decided fields of `config` (in place; the config may be locked) and returns it. Raises
    ConfigError listing every disagreement between the data and the config. Built-in datasets are left alone.
    workdir: a run's folder whose config.json, when there is one, gives the text vocabulary (resumes, evaluation).
    read_data=False (a saved config: sampling, exported models) only registers the saved text vocabulary.
    train_tokenizer=False leaves data.tokenizer=train:VOCAB as it is (format checked): the trainer validates every
    other field before a tokenizer is trained into the workdir (`tokenizer_to_train`)."""
    d = config.data
    name = str(d.get("name", ""))
    if not is_user_dataset(name):
        return config
    if not read_data:
        if text_lib.is_text_dataset(name) and d.get("vocab", "") and not _is_image_task(config):
            text_lib.register(name, d.vocab, d.get("text_field", ""))
        return config
    problems, updates = [], {}
    if _is_image_task(config) and data_lib.is_image_dataset(name):
        info = image_info(name, *data_lib.split_fractions(d))
        for field in IMAGE_FIELDS:
            have = int(d.get(field, 0) or 0)
            if have == 0:
                updates[field] = info[field]
            elif have != info[field] and (field == "num_classes" or info["exact"]):
                fix = (f"set --config.data.{field}={info[field]}, or 0 to take it from the data" if field ==
                       "num_classes" else f"set --config.data.{field}={info[field]} (the arrays are not resized)")
                problems.append(f"data.{field}={have} but {name} has {info[field]}: {fix}")
        if config.get("task") == "vit" and info["num_classes"] < 2:
            problems.append(f"{name} holds one class ({info['class_names'] or 'label 0'}), and classification needs "
                            f"two or more: put the images in one subfolder per class (a flat folder of images is "
                            f"for the generation task, dit)")
        if info["class_names"] and not d.get("class_names", ""):
            updates["class_names"] = info["class_names"]
    elif text_lib.is_text_dataset(name):
        saved = _saved_config(workdir).get("data", {})
        vocab = d.get("vocab", "") or (saved.get("vocab", "") if saved.get("name") == name else "")
        text_lib.register(name, vocab, d.get("text_field", ""))
        if not vocab:
            vocab = text_lib.train_chars(name)
            text_lib.register(name, vocab, d.get("text_field", ""))
        updates["vocab"] = vocab
        tok = str(d.get("tokenizer", ""))
        if tokenizer_to_train(config):
            if not (tok[6:].isdigit() and workdir):
                raise ConfigError(f"data.tokenizer={tok!r}: train:VOCAB (a whole number of pieces, e.g. train:8000) "
                                  f"trains a SentencePiece model into the run's workdir, and needs one")
            if train_tokenizer:
                updates["tokenizer"] = tokenized.train_tokenizer(name, int(tok[6:]), workdir)
        seq_len = int(d.get("seq_len", 0) or 0)
        for split in ("train", "test"):
            n = len(text_lib.user_text(name, split))
            if seq_len and n < seq_len:
                problems.append(f"the {split} split of {name} has {n} characters, fewer than one sequence of "
                                f"data.seq_len={seq_len}: add text or lower data.seq_len")
    if problems:
        raise ConfigError("the data and the config disagree:\n  - " + "\n  - ".join(problems))
    with config.unlocked() if hasattr(config, "unlocked") else _nothing():
        for k, v in updates.items():
            d[k] = v
    return config


def tokenizer_to_train(config) -> bool:
    """Whether data.tokenizer asks for a SentencePiece model trained on the run's own text (train:VOCAB)."""
    return str(config.data.get("tokenizer", "")).startswith("train:")


def with_char_vocab(config):
    """A copy of `config` whose text is read as characters (data.tokenizer=''): the fields a config sets besides
    its tokenizer can be validated before the tokenizer exists."""
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.data.tokenizer = ""
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
