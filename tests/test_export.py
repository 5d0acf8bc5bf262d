"""Exported models: experiments.export + dblocks.load_model give the same samples as sampling from the workdir; the
file holds no optimizer state; experiments.sample --npz / --png_dir write arrays / PNGs for FID tools. The run trains on
a folder of PNG files (folder: data) so the whole path of a user's own images is exercised once."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import dblocks
from dblocks import assemble, export, user_data
from experiments.configs import tiny_dit


def _write_folder(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for c, name in enumerate(("circle", "square")):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (12, 10), dtype=np.uint8)
                a[c * 5: c * 5 + 4] += 150
                Image.fromarray(a).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dblocks.train import train
    tmp = tmp_path_factory.mktemp("export")
    _write_folder(tmp / "pngs")
    c = tiny_dit.get_config()
    c.data.name = f"folder:{tmp / 'pngs'}"
    c.data.image_size, c.data.channels, c.data.num_classes = 8, 0, 0
    c.train.steps, c.optim.warmup_steps, c.optim.ema_decay = 2, 1, 0.5
    c.sample.grid_points = 4
    workdir = str(tmp / "run")
    user_data.resolve_fields(c, workdir)
    assert (c.data.num_classes, c.data.channels, c.data.class_names) == (2, 1, "circle,square")
    train(c, workdir)
    return tmp, workdir


def test_export_round_trip_same_samples(trained):
    tmp, workdir = trained
    out = str(tmp / "model.npz")
    summary = export.export_workdir(workdir, out)
    assert summary["units"] == 3 and os.path.getsize(out) == summary["bytes"]
    with np.load(out, allow_pickle=False) as z:
        names = z.files
        header = json.loads(str(z["__dblocks__"]))
    assert header["method"] == "dblocks" and len(header["partition"]["ranges"]) == 3
    assert not any("opt" in k or "mu" in k.split("/") or "nu" in k.split("/") for k in names)   # no Adam state
    from_workdir = assemble.load_run(workdir)
    from_file = dblocks.load_model(out)
    assert from_file.partition == from_workdir.partition
    a, la = export.sample_images(from_workdir, 6, seed=3, batch_size=4)
    b, lb = export.sample_images(from_file, 6, seed=3, batch_size=4)
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(la, [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0   # not a constant image
    # the EMA is what gets exported (ema_decay 0.5 over 2 steps differs from the raw weights)
    raw = assemble.load_run(workdir, use_ema=False)
    leaf = lambda r: np.asarray(jax_leaves(r.params[0])[0])   # noqa: E731
    assert np.array_equal(leaf(from_file), leaf(from_workdir)) and not np.array_equal(leaf(from_file), leaf(raw))


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_sample_npz_and_pngs_for_fid_tools(trained, monkeypatch):
    from PIL import Image

    from experiments import sample
    tmp, workdir = trained
    out, pngs = str(tmp / "samples.npz"), tmp / "samples_png"
    summary = sample.write_images(sample.load(workdir, None, None, True), num=5, seed=0, batch_size=5, npz=out,
                                  png_dir=str(pngs), grid_points=None, solver=None, guidance=None)
    with np.load(out) as z:
        assert z["arr_0"].shape == (5, 8, 8, 1) and z["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(z["arr_1"], [0, 1, 0, 1, 0])
        images = z["arr_0"]
    assert summary["images"] == 5
    files = sorted(pngs.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]   # one PNG per sample, the .npz's order
    for f, img in zip(files, images):
        with Image.open(f) as im:
            assert im.size == (8, 8) and im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), img[..., 0])   # lossless


def test_load_model_refuses_other_npz(tmp_path):
    p = str(tmp_path / "x.npz")
    np.savez(p, image=np.zeros(3))
    with pytest.raises(ValueError, match="not a dblocks export"):
        dblocks.load_model(p)
