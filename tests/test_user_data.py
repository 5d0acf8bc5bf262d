"""Your own data: folder:, npz:, hf: images and text:, jsonl:, hf: text through the source interface, the fields
resolve_fields takes from the data, the errors when data and config disagree, and TensorBoard event files. Every
dataset is a few tiny files the test writes."""
import glob
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from dblocks import config as config_lib
from dblocks import data as data_lib
from dblocks import logs
from dblocks import text as text_lib
from dblocks import user_data
from dblocks.tasks import get_task
from experiments.configs import tiny_ar, tiny_dit, tiny_mdm, tiny_vit


def png(path, shape, value=0, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 40, shape, dtype=np.uint8) + np.uint8(value)
    Image.fromarray(a).save(path)


def image_config(name, base=tiny_dit, **fields):
    c = base.get_config()
    c.data.name = name
    for k, v in fields.items():
        c.data[k] = v
    c.lock()   # as experiments.train gives it: resolve_fields must work on a locked config
    return c


# -- images ------------------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    """train/ and test/ with three classes; sizes differ; class 'b' is RGB, the others grey."""
    root = tmp_path / "imgs"
    for split, n in (("train", 4), ("test", 1)):
        for k, c in enumerate(("a", "b", "c")):
            for i in range(n):
                shape = (14 + i, 12, 3) if c == "b" else (12 + i, 14)
                png(str(root / split / c / f"{i}.png"), shape, value=60 * k, seed=i)
    return root


def test_folder_fields_from_the_data_and_sources(folder):
    c = image_config(f"folder:{folder}", image_size=0, channels=0, num_classes=0)
    user_data.resolve_fields(c)
    assert (c.data.num_classes, c.data.image_size, c.data.channels) == (3, 12, 3)   # 3 classes, shorter side, RGB
    assert c.data.class_names == "a,b,c"
    config_lib.validate(c)                                    # the image tasks accept the name
    task = get_task(c)
    train, val, test = (task.source(s) for s in data_lib.SPLITS)
    assert (len(train), len(val), len(test)) == (9, 3, 3)      # no validation/ folder: one of each class of train
    assert not set(train.files) & set(val.files)
    b = train.get(np.arange(9))
    assert b["image"].shape == (9, 12, 12, 3) and b["image"].dtype == np.uint8
    np.testing.assert_array_equal(b["label"], np.repeat([0, 1, 2], 3))
    assert b["image"][6:].mean() > b["image"][:3].mean() + 60    # class c was written brighter than class a
    grey = data_lib.load_images(f"folder:{folder}", "test", size=6, channels=1).get(np.arange(3))
    assert grey["image"].shape == (3, 6, 6, 1)


def test_folder_without_splits_holds_out_a_seeded_fraction(tmp_path):
    for k, c in enumerate(("x", "y")):
        for i in range(10):
            png(str(tmp_path / "f" / c / f"{i}.png"), (8, 8), value=100 * k, seed=i)
    name = f"folder:{tmp_path / 'f'}"
    train, val, test = (data_lib.FolderSource(name[7:], s, 8, 1, 0.2, 0.25) for s in data_lib.SPLITS)
    assert (len(train), len(val), len(test)) == (12, 4, 4)      # 20% test, then 25% of the other 16 validation
    assert not set(train.files) & set(test.files) and not set(train.files) & set(val.files)
    assert not set(val.files) & set(test.files)
    assert sorted(test.labels.tolist()) == sorted(val.labels.tolist()) == [0, 0, 1, 1]          # per class
    data_lib.folder_files.cache_clear()
    assert data_lib.FolderSource(name[7:], "test", 8, 1, 0.2).files == test.files   # the same split every time
    assert data_lib.FolderSource(name[7:], "test", 8, 1, 0.2, 0.1).files == test.files   # whatever val_fraction


def test_disagreements_are_refused_before_training(folder, tmp_path):
    c = image_config(f"folder:{folder}", num_classes=10)
    with pytest.raises(config_lib.ConfigError, match=r"num_classes=10 but .* has 3.*num_classes=3"):
        user_data.resolve_fields(c)
    np.savez(tmp_path / "d.npz", image=np.zeros((6, 8, 8, 1), np.uint8), label=np.arange(6) % 2)
    c = image_config(f"npz:{tmp_path / 'd.npz'}", image_size=16, num_classes=2)
    with pytest.raises(config_lib.ConfigError, match=r"image_size=16 but .* has 8"):
        user_data.resolve_fields(c)
    with pytest.raises(data_lib.DatasetMissingError, match="does not exist"):
        user_data.resolve_fields(image_config(f"folder:{tmp_path / 'nothing'}"))


def test_flat_folder_is_one_class_for_generation_and_refused_for_classification(tmp_path):
    root = tmp_path / "faces"
    for i in range(6):
        png(str(root / f"{i}.png"), (12, 12), value=10 * i, seed=i)
    c = image_config(f"folder:{root}", image_size=0, channels=0, num_classes=0)
    user_data.resolve_fields(c)
    assert (c.data.num_classes, c.data.class_names) == (1, "faces")
    config_lib.validate(c)
    splits = [get_task(c).source(s) for s in data_lib.SPLITS]
    assert sorted(f for s in splits for f in s.files) == sorted(str(root / f"{i}.png") for i in range(6))
    assert all((s.labels == 0).all() for s in splits)
    assert splits[0].get(np.arange(len(splits[0])))["image"].shape == (len(splits[0]), 12, 12, 1)
    with pytest.raises(config_lib.ConfigError, match="one class .*classification needs two"):
        user_data.resolve_fields(image_config(f"folder:{root}", base=tiny_vit, num_classes=0))


def test_folder_mixing_class_folders_and_loose_images_is_refused(tmp_path):
    png(str(tmp_path / "m" / "cats" / "0.png"), (8, 8))
    png(str(tmp_path / "m" / "loose.png"), (8, 8))
    with pytest.raises(data_lib.DataError, match=r"mixes class folders \['cats'\] with loose images"):
        user_data.resolve_fields(image_config(f"folder:{tmp_path / 'm'}"))


def test_npz_single_and_split_arrays(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "one.npz", image=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), label=np.arange(20) % 4)
    c = image_config(f"npz:{tmp_path / 'one.npz'}", base=tiny_vit, image_size=0, channels=0, num_classes=0)
    user_data.resolve_fields(c)
    assert (c.data.num_classes, c.data.image_size, c.data.channels) == (4, 8, 1)
    config_lib.validate(c)
    task = get_task(c)
    train, val, test = (task.source(s) for s in data_lib.SPLITS)
    assert (len(train), len(val), len(test)) == (12, 4, 4) and train.get(np.arange(2))["image"].shape == (2, 8, 8, 1)
    np.savez(tmp_path / "two.npz", train_image=np.zeros((5, 4, 4, 3), np.uint8), train_label=np.arange(5),
             test_image=np.ones((2, 4, 4, 3), np.uint8), test_label=np.array([0, 4]))
    src = data_lib.npz_images(str(tmp_path / "two.npz"), "test")
    assert len(src) == 2 and src.get(np.arange(2))["image"].max() == 1
    info = user_data.image_info(f"npz:{tmp_path / 'two.npz'}")
    assert (info["num_classes"], info["image_size"], info["channels"]) == (5, 4, 3)
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(3))
    with pytest.raises(data_lib.DatasetMissingError, match="expected 'image' and 'label'"):
        data_lib.npz_images(str(tmp_path / "bad.npz"), "train")


# -- text --------------------------------------------------------------------------------------------------------

def text_config(name, base=tiny_mdm, **fields):
    c = base.get_config()
    c.data.name = name
    with c.unlocked():
        for k, v in fields.items():
            c.data[k] = v
    c.lock()
    return c


def test_text_folder_splits_by_whole_files_and_vocab_from_train(tmp_path):
    words = ["amber", "birch", "cedar", "delta"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 40)) + f" #{i:02d}#" for i in range(20)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i:02d}.txt").write_text(d)
    name = f"text:{tmp_path}"
    split = {s: text_lib.user_text(name, s) for s in ("train", "validation", "test")}
    owner = {i: [s for s, t in split.items() if f"#{i:02d}#" in t] for i in range(20)}
    assert all(len(v) == 1 for v in owner.values())               # every file in exactly one split
    assert [sum(v == [s] for v in owner.values()) for s in ("train", "validation", "test")] == [18, 1, 1]
    c = text_config(name)
    user_data.resolve_fields(c)
    assert set(c.data.vocab) == set(split["train"])                # the train split's characters
    config_lib.validate(c)
    task = get_task(c)
    assert task.vocab.size == len(c.data.vocab)
    window = task.source("test").get(np.arange(1))["tokens"][0]
    assert task.vocab.decode(window) in split["test"]


def test_text_file_contiguous_split_and_the_saved_vocab_wins(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("abcdefghij" * 100 + "XYZ" * 10)                 # X, Y, Z only at the end: the test split
    name = f"text:{f}"
    assert "X" not in text_lib.user_text(name, "train") and "X" in text_lib.user_text(name, "test")
    workdir = tmp_path / "run"
    c = text_config(name, base=tiny_ar)
    user_data.resolve_fields(c, str(workdir))
    assert c.data.vocab == "abcdefghij"
    vocab = text_lib.vocab_for(name)
    assert vocab.decode(vocab.encode("aXb")) == "aab"              # unknown characters -> the unknown id
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"data": {"name": name, "vocab": "abcdefghijk"}}))
    c = text_config(name, base=tiny_ar)
    user_data.resolve_fields(c, str(workdir))                     # a resumed run decodes with its own vocabulary
    assert c.data.vocab == "abcdefghijk" and text_lib.vocab_for(name).size == 11
    with pytest.raises(config_lib.ConfigError, match="fewer than one sequence"):
        user_data.resolve_fields(text_config(name, seq_len=4096))


def test_jsonl_field_in_the_name_or_the_option(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"body": f"doc {i} " * 5, "id": i}) + "\n" for i in range(12)))
    named = text_config(f"jsonl:{p}:body")
    user_data.resolve_fields(named)
    option = text_config(f"jsonl:{p}", text_field="body")
    user_data.resolve_fields(option)
    assert named.data.vocab == option.data.vocab == "".join(sorted(set(text_lib.user_text(f"jsonl:{p}", "train"))))
    assert len(text_lib.user_text(f"jsonl:{p}", "test").split("\n\n")) == 1   # one whole document of 12
    with pytest.raises(data_lib.DatasetMissingError, match="no field 'title'"):
        user_data.resolve_fields(text_config(f"jsonl:{p}:title"))


# -- HuggingFace datasets (optional) -----------------------------------------------------------------------------

def test_hf_images_and_text_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(20)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(20)]},
                               features=feats).save_to_disk(str(tmp_path / "img"))
    c = image_config(f"hf:{tmp_path / 'img'}", image_size=0, channels=0, num_classes=0)
    user_data.resolve_fields(c)
    assert (c.data.num_classes, c.data.image_size, c.data.channels, c.data.class_names) == (2, 12, 3, "cat,dog")
    task = get_task(c)
    train, val, test = (task.source(s) for s in data_lib.SPLITS)
    assert (len(train), len(val), len(test)) == (16, 2, 2) and train.get(np.arange(3))["image"].shape == (3, 12, 12, 3)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"story": ["once upon a time"] * 30}),
                          "test": datasets.Dataset.from_dict({"story": ["the end"] * 3})}).save_to_disk(
        str(tmp_path / "txt"))
    t = text_config(f"hf:{tmp_path / 'txt'}", seq_len=4)
    user_data.resolve_fields(t)                                    # its only string column
    assert t.data.vocab == "".join(sorted(set("once upon a time\n")))
    assert text_lib.user_text(t.data.name, "test") == "the end\n\nthe end\n\nthe end"
    assert text_lib.user_text(t.data.name, "validation").startswith("once upon")   # from train, not the test split


# -- TensorBoard -------------------------------------------------------------------------------------------------

def read_events(path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing, tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (n,) = struct.unpack("<Q", header[:8])
            e = event_pb2.Event.FromString(f.read(n))
            f.read(4)
            out += [(v.tag, e.step, v.simple_value) for v in e.summary.value]
    return out


def test_metrics_writer_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    w = logs.MetricsWriter(str(tmp_path))
    w.write({"unit": "block_00", "step": 10, "loss": np.float32(0.5), "lr": 1e-3, "examples_per_s": 640.0,
             "steps_per_s": 10.0, "mse": 0.25, "note": "text is not a scalar"})
    w.write({"unit": "block_01", "step": 10, "loss": 0.75})
    w.close()
    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    got = {(tag, step): round(v, 6) for tag, step, v in read_events(events)}
    assert got == {("block_00/loss", 10): 0.5, ("block_00/lr", 10): 0.001, ("block_00/examples_per_s", 10): 640.0,
                   ("block_00/steps_per_s", 10): 10.0, ("block_00/mse", 10): 0.25, ("block_01/loss", 10): 0.75}
    assert len(logs.read_metrics(str(tmp_path))) == 2              # metrics.jsonl is still the record
