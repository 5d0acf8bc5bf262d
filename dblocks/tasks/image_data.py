"""Labelled-image data shared by the image tasks (DiT generation, ViT classification): the source of a split, the
batch in the model's range, and a dummy batch for shape-only work (initialisation, memory analysis)."""
from __future__ import annotations

import numpy as np

from dblocks import data as data_lib


class LabelledImages:
    """Mixin for a Task whose data is `config.data` = (name, image_size, channels, num_classes, path, data_dir)."""
    defaults = {"data": {"test_fraction": data_lib.TEST_FRACTION,   # held out when the data has no test split
                         "flip": False,                              # random horizontal flips in training
                         "class_names": ""}}                         # comma-separated row labels of sample grids

    def data_signature_fields(self):
        return ("name", "image_size", "channels", "num_classes")

    def source(self, split: str):
        d = self.config.data
        return data_lib.load_images(d.name, split, d.path, d.data_dir, num_classes=d.num_classes,
                                    size=d.image_size, channels=d.channels,
                                    test_fraction=float(d.test_fraction))

    def make_batch(self, examples, train):
        """Training batches keep uint8 pixels (converted on the device by the task's loss: images.to_model_range);
        evaluation batches are float32 in [-1, 1]."""
        image = examples["image"] if train else data_lib.to_model_range(examples["image"])
        return {"image": image, "label": examples["label"].astype(np.int32)}

    def dummy_batch(self, n: int = 2) -> dict:
        d = self.config.data
        return {"image": np.zeros((n, d.image_size, d.image_size, d.channels), np.float32),
                "label": np.zeros((n,), np.int32)}
