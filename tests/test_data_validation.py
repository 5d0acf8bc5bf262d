"""Bad data is refused whole before training, with one line naming the file (a DataError: exit status 2), or skipped
and counted with a warning; one test per kind of bad input. Every dataset is a few tiny files the test writes."""
import logging
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from dblocks import data as data_lib
from dblocks import files as files_lib
from dblocks import text as text_lib
from dblocks import user_data
from dblocks.tasks import get_task
from experiments.common import user_errors
from experiments.configs import tiny_dit, tiny_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_caches():
    for f in (data_lib.scan_folder, data_lib.folder_files, files_lib._npz_header, files_lib._npz_array):
        f.cache_clear()
    text_lib._user_text.cache_clear()
    yield


def png(path, value=0, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def image_config(name, base=tiny_vit, **fields):
    c = base.get_config()
    c.data.name = name
    with c.unlocked():
        for k, v in fields.items():
            c.data[k] = v
    c.data.num_classes = c.data.image_size = c.data.channels = 0
    c.lock()
    return c


def exit_status(fn) -> int:
    """The exit status an entry point gives for what fn raises (experiments.common.user_errors)."""
    with pytest.raises(SystemExit) as e, user_errors():
        fn()
    return e.value.code


# -- arrays (.npz) -------------------------------------------------------------------------------------------------

def test_npz_images_and_labels_of_different_lengths_are_refused(tmp_path):
    path = str(tmp_path / "a.npz")   # before: trained on the 8 images the held-out split of 10 labels picked
    np.savez(path, image=np.zeros((64, 8, 8), np.uint8), label=np.arange(10) % 2)
    with pytest.raises(data_lib.DataError, match="has 64 images but label has 10 labels"):
        data_lib.npz_images(path, "train")
    assert exit_status(lambda: data_lib.npz_images(path, "train")) == 2


@pytest.mark.parametrize("label,message", [
    (np.array([0, 1, -1, 1] * 4), "label -1 at index 2"),                       # was the guidance 'no label' class
    (np.eye(2, dtype=np.int64)[np.arange(16) % 2], r"shape \[16, 2\] \(one-hot"),
    (np.arange(16) % 2 + 0.0, "integer class ids 0..K-1; got dtype float64"),
])
def test_npz_labels_must_be_class_ids(tmp_path, label, message):
    path = str(tmp_path / "a.npz")
    np.savez(path, image=np.zeros((16, 8, 8), np.uint8), label=label)
    with pytest.raises(data_lib.DataError, match=message):
        user_data.resolve_fields(image_config(f"npz:{path}"))


def test_a_stray_large_label_id_is_refused_not_a_giant_label_table(tmp_path):
    path = str(tmp_path / "a.npz")
    label = np.arange(20) % 2
    label[7] = 999
    np.savez(path, image=np.zeros((20, 8, 8), np.uint8), label=label)
    with pytest.raises(data_lib.DataError, match="labels use 3 class ids but the largest is 999"):
        user_data.resolve_fields(image_config(f"npz:{path}"))


def test_files_that_are_not_npz_arrays_are_named(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.npz", format="PNG")   # an image named .npz
    with pytest.raises(data_lib.DataError, match="is not an .npz file"):
        data_lib.npz_images(str(tmp_path / "x.npz"), "train")
    with zipfile.ZipFile(tmp_path / "y.npz", "w") as z:   # a zip of something else
        z.writestr("image.npy", b"not an array")
    with pytest.raises(data_lib.DataError, match="member 'image.npy' is not a NumPy array"):
        data_lib.npz_images(str(tmp_path / "y.npz"), "train")
    np.savez(tmp_path / "z.npz", image=np.zeros((4, 8, 8), np.float32), label=np.arange(4))
    with pytest.raises(data_lib.DataError, match="image must be uint8"):
        data_lib.npz_images(str(tmp_path / "z.npz"), "train")


def test_npz_size_is_checked_from_the_headers_before_anything_is_loaded(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.npz")   # 8 MiB of zeros compressed to a few KiB
    np.savez_compressed(path, image=np.zeros((2048, 64, 64), np.uint8), label=np.zeros(2048, np.int64))
    assert os.path.getsize(path) < 100_000
    monkeypatch.setenv("DBLOCKS_MAX_DATA_BYTES", str(4 << 20))
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load before the size check"))
    with pytest.raises(data_lib.DataError, match=r"expands to 0.01 GiB of arrays, more than the 0.00 GiB limit"):
        data_lib.npz_images(path, "train")


# -- folders of images -------------------------------------------------------------------------------------------

def test_symlink_loops_and_links_into_another_class_are_read_once(tmp_path, caplog):
    root = tmp_path / "imgs"
    for c, v in (("a", 0), ("b", 200)):
        for i in range(3):
            png(str(root / c / f"{i}.png"), value=v)
    os.symlink(root / "a", root / "a" / "loop")            # a loop: a/loop/loop/... is a
    os.symlink(root / "b", root / "a" / "b_link")          # b's images inside class a
    os.symlink(root / "a" / "0.png", root / "a" / "again.png")
    os.symlink(root / "b" / "0.png", root / "a" / "from_b.png")   # one of b's images, linked into a
    with caplog.at_level(logging.WARNING, logger="dblocks"):
        scan = data_lib.scan_folder(str(root))
    files, labels = scan.splits["train"]
    assert len(files) == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    src = data_lib.FolderSource(str(root), "train", 8, 1, 0.0, 0.0)
    b = src.get(np.arange(6))
    assert b["image"][:3].max() == 0 and b["image"][3:].min() == 200   # every image under its own class
    assert "skipped 4 file(s)" in caplog.text and "link into another class" in caplog.text
    assert "a link loop" in caplog.text and "the same file as one read before" in caplog.text


def test_unreadable_image_files_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        for i in range(4):
            png(str(root / c / f"{i}.png"))
    (root / "b" / "3.png").write_bytes(b"\x89PNG garbage")       # not among the first files
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "b" / "2.png", format="PCX")   # a decoder not allowed
    with caplog.at_level(logging.WARNING, logger="dblocks"):
        files, labels, _ = data_lib.folder_files(str(root), "train", 0.0, 0.0)
    assert len(files) == 6 and not any(f.endswith(("b/3.png", "b/2.png")) for f in files)
    assert "skipped 2 file(s)" in caplog.text and "b/3.png" in caplog.text


def test_an_image_that_fails_to_decode_is_replaced_the_same_way_every_time(tmp_path, caplog):
    root = tmp_path / "imgs"
    for c, v in (("a", 10), ("b", 200)):
        for i in range(3):
            png(str(root / c / f"{i}.png"), value=v + i, size=64)
    raw = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1.png").write_bytes(raw[:len(raw) // 2])      # the header reads; the pixels do not
    src = data_lib.FolderSource(str(root), "train", 8, 1, 0.0, 0.0)
    assert len(src) == 6
    with caplog.at_level(logging.WARNING, logger="dblocks"):
        b = src.get(np.arange(6))
    assert b["image"][1].max() == 12 and b["label"].tolist() == [0, 0, 0, 1, 1, 1]   # a/2.png in a/1.png's place
    assert "cannot decode" in caplog.text and "a/1.png" in caplog.text
    again = data_lib.FolderSource(str(root), "train", 8, 1, 0.0, 0.0).get(np.arange(6))
    np.testing.assert_array_equal(again["image"], b["image"])


# -- splits and the run's identity -------------------------------------------------------------------------------

def test_changing_a_held_out_fraction_changes_the_run_signature(tmp_path):
    path = str(tmp_path / "a.npz")
    np.savez(path, image=np.zeros((40, 8, 8), np.uint8), label=np.arange(40) % 2)
    sigs = []
    for fields in ({}, {"test_fraction": 0.3}, {"val_fraction": 0.3}):
        c = user_data.resolve_fields(image_config(f"npz:{path}", **fields))
        sigs.append(get_task(c).signature())
    assert sigs[0] != sigs[1] and sigs[0] != sigs[2] and sigs[1] != sigs[2]
    builtin = tiny_dit.get_config()   # a built-in dataset at its defaults keeps its signature
    assert set(get_task(builtin).signature()["data"]) == {"name", "image_size", "channels", "num_classes"}


def test_fashion_mnist_validation_is_carved_from_train_never_the_test_split(tmp_path):
    def idx(path, array):
        with open(path, "wb") as f:
            f.write(bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape))
            f.write(array.astype(np.uint8).tobytes())
    for prefix, n, v in (("train", 40, 1), ("t10k", 10, 99)):
        idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), v))
        idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 2)
    with pytest.raises(data_lib.DataError, match="no validation split of its own and data.val_fraction=0"):
        data_lib.load_images("fashion_mnist", "validation", str(tmp_path))
    assert len(data_lib.load_images("fashion_mnist", "train", str(tmp_path))) == 40   # the paper's whole train
    train, val, test = (data_lib.load_images("fashion_mnist", s, str(tmp_path), val_fraction=0.25)
                        for s in data_lib.SPLITS)
    assert (len(train), len(val), len(test)) == (30, 10, 10)
    assert val.arrays["image"].max() == 1 and test.arrays["image"].min() == 99


def test_hf_text_without_a_validation_split_holds_documents_out_of_train():
    docs = [f"document {i} " * 3 for i in range(40)]
    own_test = frozenset({"test"})
    train, val = (text_lib.split_documents(docs, s, keep=own_test) for s in ("train", "validation"))
    assert val and not set(val.split("\n\n")) & set(train.split("\n\n"))
    assert len(train.split("\n\n")) + len(val.split("\n\n")) == 40     # none taken for test: it has its own
    assert text_lib.split_documents(docs, "test", keep=own_test) == ""


def test_hf_images_validation_from_train_and_unlabelled_rows_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    data_lib.hf_dataset.cache_clear()
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def rows(n, value, labels):
        return datasets.Dataset.from_dict({"image": [Image.fromarray(np.full((8, 8), value, np.uint8))] * n,
                                           "label": labels}, features=feats)
    datasets.DatasetDict({"train": rows(20, 10, [i % 2 for i in range(20)]),
                          "test": rows(4, 99, [0, 1, 0, 1])}).save_to_disk(str(tmp_path / "ok"))
    name = f"hf:{tmp_path / 'ok'}"
    train, val, test = (data_lib.load_images(name, s, size=8, channels=1) for s in data_lib.SPLITS)
    assert (len(train), len(val), len(test)) == (18, 2, 4)          # validation: a tenth of train, not the test split
    assert val.get(np.arange(2))["image"].max() == 10 and test.get(np.arange(4))["image"].min() == 99
    datasets.DatasetDict({"train": rows(4, 10, [0, 1, 0, 1]),
                          "test": rows(2, 99, [0, -1])}).save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(data_lib.DataError, match="label -1 at index 1"):
        user_data.resolve_fields(image_config(f"hf:{tmp_path / 'unlabelled'}"))


# -- text ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    (b'{"text": "fine"}\n{"text": "broken\n', "line 2 is not valid JSON"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "line 2 is not UTF-8"),
    (b'{"text": "fine"}\n["a list"]\n', "line 2 is a JSON list, not an object"),
])
def test_bad_json_lines_are_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(data_lib.DataError, match=message):
        text_lib.user_text(f"jsonl:{tmp_path / 'd.jsonl'}", "train")
    assert exit_status(lambda: text_lib.user_text(f"jsonl:{tmp_path / 'd.jsonl'}", "test")) == 2


def test_non_utf8_text_is_refused_not_replaced(tmp_path):
    (tmp_path / "t.txt").write_bytes("plain text ".encode() * 50 + b"caf\xe9")
    with pytest.raises(data_lib.DataError, match=r"t.txt is not UTF-8 text \(byte 553"):
        text_lib.user_text(f"text:{tmp_path / 't.txt'}", "train")


def test_an_unreadable_input_file_is_a_user_error_not_a_write_error(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("some text " * 100)
    real_open = open

    def deny(path, *a, **k):
        if str(path).endswith("t.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    assert exit_status(lambda: text_lib.user_text(f"text:{tmp_path / 't.txt'}", "train")) == 2   # was 5


def test_text_folders_follow_links_once(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("alpha " * 20)
    os.symlink(tmp_path / "c", tmp_path / "c" / "loop")
    os.symlink(tmp_path / "c" / "a.txt", tmp_path / "c" / "again.txt")
    assert text_lib.user_text(f"text:{tmp_path / 'c'}", "train").count("alpha") < 20   # 90 % of one copy


# -- through the command line ------------------------------------------------------------------------------------

@pytest.mark.faults
def test_train_cli_exits_2_with_one_line_naming_the_file(tmp_path):
    path = str(tmp_path / "a.npz")
    np.savez(path, image=np.zeros((64, 8, 8), np.uint8), label=np.arange(10) % 2)
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                           os.path.join(ROOT, "experiments/configs/tiny_vit.py"), "--workdir", str(tmp_path / "w"),
                           f"--config.data.name=npz:{path}", "--config.data.num_classes=0",
                           "--config.data.image_size=0", "--config.data.channels=0"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {path}: image has 64 images but label has 10 labels" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "w")
