r"""A tiny DiT on synthetic 16x16 images, for tests: compiles and trains in seconds.

  python -m experiments.train --config experiments/configs/tiny_dit.py --workdir /tmp/tiny
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "dit"
    c.data.name = "synthetic"
    c.data.image_size = 8
    c.data.channels = 1
    c.data.num_classes = 4
    c.data.flip = False
    c.data.batch_size = 8

    c.model = dict(**model_defaults(), num_layers=3, hidden=16, heads=2, patch=4, mlp_ratio=2.0,
                   dropout=0.0, class_dropout=0.1)

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.steps = 6
    c.train.log_every = 3
    c.train.ckpt_every = 3
    c.train.sample_at_end = False
    c.train.plot_at_end = False

    c.sample = dict(grid_points=6, solver="euler", grid_kind="cdf", guidance=2.0, per_class=2)
    return c
