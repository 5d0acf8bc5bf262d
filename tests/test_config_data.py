"""Config validation (refused before anything compiles) and the data sources."""
import os
import subprocess
import sys

import numpy as np
import pytest

from dblocks import config as config_lib
from dblocks import data as data_lib
from experiments.configs import cifar10_dit, fashion_mnist_dit, tiny_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problems(**overrides):
    c = tiny_dit.get_config()
    c.update_from_flattened_dict(overrides)
    try:
        config_lib.validate(c)
    except config_lib.ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("overrides,message", [
    ({"blocks.num_blocks": 4}, "larger than model.num_layers"),
    ({"model.num_layers": 4}, "not divisible by blocks.num_blocks=3"),
    ({"blocks.gamma": -0.1}, "blocks.gamma=-0.1 must be in [0, 10]"),
    ({"blocks.gamma": 1e4}, "blocks.gamma=10000.0 must be in [0, 10]"),      # was an OverflowError in exp()
    ({"seed": -1}, "seed=-1 must be an integer in [0, 2**32)"),
    ({"edm.sigma_max": float("inf")}, "edm.sigma_max=inf must be finite"),
    ({"optim.b1": 1.5}, "optim.b1=1.5 must be in [0, 1)"),
    ({"optim.b2": -0.1}, "optim.b2=-0.1 must be in [0, 1)"),
    ({"optim.weight_decay": -0.01}, "optim.weight_decay=-0.01 must be >= 0"),
    ({"optim.grad_clip": -1.0}, "optim.grad_clip=-1.0 must be >= 0"),
    ({"optim.min_lr_ratio": 1.5}, "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0 must be an integer >= 1"),
    ({"data.image_size": 0}, "data.image_size=0 must be an integer >= 1"),
    ({"data.num_classes": -2}, "data.num_classes=-2 must be an integer >= 1"),
    ({"data.channels": 0}, "data.channels=0 must be an integer >= 1"),
    ({"edm.max_weight": 0.0}, "edm.max_weight=0.0 must be > 0"),
    ({"edm.sigma_min": 80.0}, "must be > 0 and < edm.sigma_max"),
    ({"data.name": "imagenet"}, "data.name='imagenet' is unknown"),
    ({"blocks.train": "3"}, "indices must be in 0..2"),
    ({"blocks.train": "x"}, "use 'all' or block indices"),
    ({"blocks.layers": "1,1"}, "must give 3 positive counts summing to 3"),
    ({"method": "backprop"}, "method='backprop' is unknown"),
    ({"task": "gan"}, "task='gan' is unknown"),
    ({"edm.loss_weighting": "snr"}, "edm.loss_weighting='snr'"),
    ({"data.image_size": 10}, "not divisible by model.patch"),
    ({"sample.grid_points": 2}, "cannot visit all 3 blocks"),
    ({"sample.solver": "rk4"}, "sample.solver='rk4'; choose one of"),
    ({"sample.grid_kind": "linear"}, "sample.grid_kind='linear'; choose one of ('cdf', 'karras')"),
    ({"sample.grid_kind": "karras", "sample.grid_points": 5}, "on the karras grid: a 5-point grid never runs block"),
    ({"optim.warmup_steps": 100}, "optim.warmup_steps=100 must be in [0, train.steps=6]"),
    ({"optim.warmup_steps": 6}, "must be < train.steps=6 with optim.schedule='cosine'"),   # was optax's ValueError
    ({"model.heads": 0}, "model.heads=0 must be > 0"),          # was a ZeroDivisionError in the task's checks
    ({"model.patch": 0}, "model.patch=0 must be > 0"),
    ({"model.hidden": -16}, "model.hidden=-16 must be > 0"),
    ({"model.dropout": 1.0}, "model.dropout=1.0 must be in [0, 1)"),
    ({"edm.sigma_data": float("nan")}, "edm.sigma_data=nan must be a number"),
])
def test_invalid_configs_are_refused_with_a_clear_message(overrides, message):
    assert message in _problems(**overrides)


def test_all_problems_are_listed_at_once():
    msg = _problems(**{"blocks.gamma": -1.0, "edm.sigma_min": 100.0})
    assert "gamma" in msg and "sigma_min" in msg


def test_shipped_configs_are_valid():
    for mod in (tiny_dit, fashion_mnist_dit, cifar10_dit):
        config_lib.validate(mod.get_config())
    assert _problems(**{"model.num_layers": 5, "blocks.layers": "1,2,2"}) == ""


def test_train_cli_refuses_bad_config_before_compiling(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config", "experiments/configs/tiny_dit.py",
                           "--workdir", str(tmp_path / "w"), "--config.blocks.num_blocks=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "blocks.num_blocks=5 is larger than model.num_layers=3" in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # nothing written


def test_batch_order_is_a_pure_function_and_covers_an_epoch():
    a = data_lib.batch_indices(100, 10, seed=0, unit=1, step=7)
    np.testing.assert_array_equal(a, data_lib.batch_indices(100, 10, seed=0, unit=1, step=7))
    assert not np.array_equal(a, data_lib.batch_indices(100, 10, seed=0, unit=2, step=7))
    epoch = np.concatenate([data_lib.batch_indices(100, 10, 0, 1, s) for s in range(10)])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
    with pytest.raises(ValueError, match="exceeds"):
        data_lib.batch_indices(5, 10, 0, 0, 0)


def test_fashion_mnist_from_the_debian_package():
    if not os.path.exists(os.path.join(data_lib.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("dataset-fashion-mnist not installed (./launch.sh setup installs it)")
    src = data_lib.load_fashion_mnist("test")
    assert len(src) == 10_000
    b = src.get(np.arange(5))
    assert b["image"].shape == (5, 28, 28, 1) and b["image"].dtype == np.uint8
    assert b["label"].tolist() == [9, 2, 1, 1, 6]  # the first five test labels of Fashion-MNIST
    x = data_lib.to_model_range(b["image"])
    assert x.min() >= -1 and x.max() <= 1


def test_missing_dataset_names_the_install_command(tmp_path):
    with pytest.raises(data_lib.DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        data_lib.load_fashion_mnist("train", str(tmp_path))


def test_tfds_data_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        src = data_lib.load_images("tfds:mnist", "train")
        assert len(src) == 12
        b = src.get(np.array([0, 3, 5]))
    assert b["image"].shape == (3, 28, 28, 1) and b["label"].shape == (3,)


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "experiments.train", "--config", "experiments/configs/tiny_dit.py",
                           "--workdir", str(tmp_path / "w"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_unknown_config_field_is_refused_with_the_closest_names(tmp_path):
    proc = _cli(tmp_path, "--config.optim.learning_rat=0.1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown field --config.optim.learning_rat" in proc.stderr and "optim.lr" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "w")


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    for arg, message in [("--config.nonexistent=3", "unknown field --config.nonexistent"),
                         ("--config.model.heads=0", "model.heads=0 must be > 0"),
                         ("--config.model.heads=abc", "--config.model.heads=abc")]:
        proc = _cli(tmp_path, arg)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (arg, proc.stderr)
    assert not os.path.exists(tmp_path / "w")


def test_lm1b_validation_is_held_out_from_train_not_the_test_split(monkeypatch):
    from dblocks import tokenized
    asked = []

    def fake_tokens(name, split, vocab, data_dir="", cache_dir=None):
        asked.append(split)
        return np.arange(10_000 if split == "train" else 500, dtype=np.int32) + (0 if split == "train" else 10**6)

    monkeypatch.setattr(tokenized, "packed_tokens", fake_tokens)
    train = tokenized.packed_source("lm1b", "train", 10, vocab=None).get(np.arange(990))["tokens"]
    val = tokenized.packed_source("lm1b", "validation", 10, vocab=None)
    test = tokenized.packed_source("lm1b", "test", 10, vocab=None)
    assert asked == ["train", "train", "test"]          # validation never reads the test split
    assert len(val) == 10 and len(train) == 990         # 1 % of train held out
    assert val.get(np.arange(10))["tokens"].min() > train.max()   # disjoint from what is trained on
    assert test.get(np.arange(1))["tokens"].min() >= 10**6
