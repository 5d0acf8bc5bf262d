r"""A tiny ViT classifier on synthetic 8x8 images, for tests: compiles and trains in seconds.

  python -m experiments.compare --config experiments/configs/tiny_vit.py --workdir /tmp/tiny_vit_cmp
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "vit"
    c.data.name = "synthetic"
    c.data.image_size = 8
    c.data.channels = 1
    c.data.num_classes = 4
    c.data.flip = False
    c.data.randaugment_ops = 0
    c.data.randaugment_magnitude = 9
    c.data.batch_size = 16

    c.model = dict(**model_defaults(), num_layers=3, hidden=16, heads=2, patch=4, mlp_ratio=2.0, dropout=0.0,
                   target_dim=0, target_norm=0.0, target_seed=0)

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.train.steps = 8
    c.train.log_every = 4
    c.train.ckpt_every = 4
    c.train.sample_at_end = False
    c.train.plot_at_end = False

    c.sample = dict(grid_points=3, solver="euler", bridge="softmax", per_class=2)
    return c
