"""Labelled-image data shared by the image tasks (DiT generation, ViT classification): the source of a split, the
batch in the model's range, a dummy batch for shape-only work (initialisation, memory analysis), and the class names
that label the rows of their sample grids."""
from __future__ import annotations

import numpy as np

from dblocks import data as data_lib


def class_names(config) -> list[str]:
    """Row labels for image grids: Fashion-MNIST's names, the data's own class names (folder:, hf:), or numbers."""
    k = int(config.data.num_classes)
    if config.data.name == "fashion_mnist":
        return list(data_lib.FASHION_MNIST_CLASSES)
    names = [n for n in str(config.data.class_names or "").split(",") if n]
    return names if len(names) == k else [f"class {c}" for c in range(k)]


class LabelledImages:
    """Mixin for a Task whose data is `config.data` = (name, image_size, channels, num_classes, path, data_dir,
    and optionally test_fraction / val_fraction)."""
    defaults = {"data": {"flip": False,          # random horizontal flips in training
                         "class_names": ""}}                         # comma-separated row labels of sample grids

    def data_signature_fields(self):
        return ("name", "image_size", "channels", "num_classes")

    def signature(self) -> dict:
        """The Task signature plus the held-out fractions wherever they decide which examples train: your own
        images (always) and a built-in dataset with a validation split carved from train (val_fraction > 0).
        Changing them moves examples between train and the held-out splits, so blocks trained with other fractions
        are another run. A built-in dataset at its defaults keeps the signature it always had."""
        sig = super().signature()
        d = self.config.data
        test_fraction, val_fraction = data_lib.split_fractions(d)
        if str(d.name).startswith(data_lib.USER_IMAGE_PREFIXES):
            sig["data"] = {**sig["data"], "test_fraction": test_fraction, "val_fraction": val_fraction}
        elif val_fraction > 0:
            sig["data"] = {**sig["data"], "val_fraction": val_fraction}
        return sig

    def source(self, split: str):
        d = self.config.data
        test_fraction, val_fraction = data_lib.split_fractions(d)
        return data_lib.load_images(d.name, split, d.path, d.data_dir, num_classes=d.num_classes,
                                    size=d.image_size, channels=d.channels, test_fraction=test_fraction,
                                    val_fraction=val_fraction)

    def make_batch(self, examples, train):
        """Training batches keep uint8 pixels (converted on the device by the task's loss: images.to_model_range);
        evaluation batches are float32 in [-1, 1]."""
        image = examples["image"] if train else data_lib.to_model_range(examples["image"])
        return {"image": image, "label": examples["label"].astype(np.int32)}

    def dummy_batch(self, n: int = 2) -> dict:
        d = self.config.data
        return {"image": np.zeros((n, d.image_size, d.image_size, d.channels), np.float32),
                "label": np.zeros((n,), np.int32)}
