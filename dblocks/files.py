"""Reading and writing data files without surprises: limits checked before anything large is read, image decoders
restricted to the formats dblocks reads, every failure one line naming the file, and side files (caches) written
to a temporary name and renamed, so a reader sees the old file or the new one, never half of one.

  header = npz_header(path)             # {array name: (shape, dtype)} from the .npy headers, nothing loaded
  a = npz_array(path, "image")          # one array, after npz_header's checks
  raw = read_bytes(path, "text file")   # the whole file, refused first when it is larger than the limit
  with open_image(path) as img: ...     # PIL image, PNG/JPEG/... decoders only, decompression bombs refused
  save_npy_atomic(path, array)          # tmp + fsync + rename

Limits: an array file may expand to at most max_data_bytes() (half the machine's memory, or
$DBLOCKS_MAX_DATA_BYTES); a text file may be at most max_data_bytes() // 8 bytes (its characters are held as
4-byte code points and again as int32 ids while it is tokenized).
"""
from __future__ import annotations

import functools
import os
import warnings
import zipfile
from typing import IO, Callable

import numpy as np

from dblocks.data_errors import DataError

# Pillow decoders allowed: the formats of dblocks.data.IMAGE_EXTENSIONS (PPM covers .pgm). Anything else (EPS through
# Ghostscript, PSD, ...) is never tried, whatever the file's name or content.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")


def decode_errors() -> tuple[type[BaseException], ...]:
    """What a decoder may raise on a damaged or hostile file (Pillow raises SyntaxError for some broken PNG chunks,
    DecompressionBombError or, made an error by open_image, DecompressionBombWarning for huge images)."""
    from PIL import Image
    return (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError,
            Image.DecompressionBombWarning)


def max_data_bytes() -> int:
    """The most bytes a dataset's arrays may expand to: $DBLOCKS_MAX_DATA_BYTES, else half the machine's memory."""
    env = os.environ.get("DBLOCKS_MAX_DATA_BYTES", "")
    if env:
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):   # not available on this system
        return 8 << 30


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def cannot_read(path: str, e: OSError) -> DataError:
    """The user error for a data file the OS will not give us (missing, no permission, a directory, ...)."""
    return DataError(f"cannot read {path}: {e.strerror or e}")


def read_bytes(path: str, what: str = "file", limit: int | None = None) -> bytes:
    """The bytes of `path`; refused (DataError) when it is larger than `limit` (default max_data_bytes() // 8)."""
    limit = max_data_bytes() // 8 if limit is None else limit
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise DataError(f"{what} {path} is {_gib(size)}, more than the {_gib(limit)} dblocks reads at once "
                            f"(set DBLOCKS_MAX_DATA_BYTES to allow more, or split the file)")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise cannot_read(path, e) from e


# -- .npz ---------------------------------------------------------------------------------------------------------

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@functools.lru_cache(maxsize=8)
def _npz_header(path: str, mtime: float) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    del mtime   # part of the cache key: a rewritten file is read again
    try:
        zf = zipfile.ZipFile(path)
    except OSError as e:
        raise cannot_read(path, e) from e
    except zipfile.BadZipFile as e:
        raise DataError(f"{path} is not an .npz file (not a zip archive): write it with np.savez or "
                        f"np.savez_compressed") from e
    out, total = {}, 0
    with zf:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = _HEADER_READERS[version](f)
            except (ValueError, KeyError, EOFError, zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{path}: member {info.filename!r} is not a NumPy array ({type(e).__name__}: "
                                f"{e}); write the file with np.savez") from e
            if dtype.hasobject:
                raise DataError(f"{path}: array {name!r} holds Python objects ({dtype}); dblocks reads numeric "
                                f"arrays only (uint8 images, integer labels)")
            out[name] = (tuple(int(s) for s in shape), dtype)
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if total > max_data_bytes():
        raise DataError(f"{path} expands to {_gib(total)} of arrays, more than the {_gib(max_data_bytes())} limit "
                        f"(half the machine's memory; set DBLOCKS_MAX_DATA_BYTES to allow more)")
    return out


def npz_header(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an .npz, read from the .npy headers of its members: nothing is decompressed.
    Refuses (DataError) a file that is not an .npz, object arrays, and arrays that would expand beyond
    max_data_bytes()."""
    try:
        mtime = os.path.getmtime(path)
    except OSError as e:
        raise cannot_read(path, e) from e
    return _npz_header(path, mtime)


@functools.lru_cache(maxsize=8)
def _npz_array(path: str, mtime: float, key: str) -> np.ndarray:
    del mtime
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except OSError as e:
        raise cannot_read(path, e) from e
    except (ValueError, EOFError, zipfile.BadZipFile) as e:   # a member shorter than its header says, ...
        raise DataError(f"{path}: array {key!r} cannot be read ({type(e).__name__}: {e})") from e


def npz_array(path: str, key: str) -> np.ndarray:
    """One array of an .npz, after npz_header has checked the whole file (cached until the file changes)."""
    npz_header(path)
    return _npz_array(path, os.path.getmtime(path), key)


# -- images -------------------------------------------------------------------------------------------------------

def open_image(source):
    """PIL.Image.open(source) with only IMAGE_FORMATS' decoders, and images over Pillow's decompression-bomb size
    (MAX_IMAGE_PIXELS, about 89M pixels) refused instead of warned about. The caller closes it (a context manager)."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(source, formats=IMAGE_FORMATS)


# -- side files ---------------------------------------------------------------------------------------------------

def write_atomic(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
    """`write(f)` into a temporary file beside `path`, fsync, rename over `path`: a reader (or a crash) sees the old
    file or the new one, never half a file. The one place dblocks writes a side file (arrays, JSON, exports)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """np.save, atomically (write_atomic)."""
    write_atomic(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))
