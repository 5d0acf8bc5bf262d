"""Image grids a person can look at (PNG)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def to_model_range(images):
    """Images as the model reads them: uint8 [0, 255] -> float32 [-1, 1] (per-pixel std about 0.5, matching
    sigma_data); float images pass unchanged. Works on numpy and on jax arrays: training batches travel to the device
    as uint8 (a quarter of the bytes) and are converted there, inside the compiled step."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, rows: int, path: str, row_labels: list[str] | None = None, scale: int = 3,
              pad: int = 2) -> str:
    """images [rows*cols, H, W, C] in [-1, 1] -> a PNG grid, one row per `rows`, optional labels on the left."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    cols = n // rows
    label_w = 100 if row_labels else 0
    canvas = np.full((pad + rows * (h * scale + pad), label_w + pad + cols * (w * scale + pad), 3), 255, np.uint8)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        img = np.repeat(np.repeat(images[i], scale, 0), scale, 1)
        img = np.repeat(img, 3, -1) if c == 1 else img[..., :3]
        y, x = pad + r * (h * scale + pad), label_w + pad + k * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = img
    pil = Image.fromarray(canvas)
    if row_labels:
        draw = ImageDraw.Draw(pil)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((4, pad + r * (h * scale + pad) + h * scale // 2 - 5), text, fill=(0, 0, 0))
    pil.save(path)
    return path
