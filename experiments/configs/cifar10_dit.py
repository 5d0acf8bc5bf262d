r"""The paper's CIFAR-10 setting (Table 2): DiT-S/2, 12 layers, hidden 384, 6 heads, patch 2, B=3, gamma=0.05,
AdamW lr 1e-4, batch 512, 100 epochs, 50 Euler steps, guidance 2.0. An accelerator job.

  python -m experiments.train --config experiments/configs/cifar10_dit.py --workdir runs/cifar10_dit \
      --config.data.data_dir=$HOME/tensorflow_datasets
  python -m experiments.memory --config experiments/configs/cifar10_dit.py   # runs on CPU: compiles only

CIFAR-10 comes from `tfds.data_source('cifar10')`; prepare it once with
`tfds build cifar10 --file_format=array_record` (needs TensorFlow on that machine only).
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "dit"
    c.data.name = "tfds:cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.num_classes = 10
    c.data.flip = True
    c.data.batch_size = 512

    c.model = dict(**model_defaults(), num_layers=12, hidden=384, heads=6, patch=2, mlp_ratio=4.0, dropout=0.0,
                   class_dropout=0.1)
    # 256 tokens: attention in query chunks is as fast here and needs less memory (docs/performance.md, "Speed")
    c.model.attention = "chunked"

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.9999
    # With the ramp min(0.9999, (1 + t) / (10 + t)) the average forgets its initialisation early; without it,
    # 0.9999 over this config's 9,765 steps per unit would keep 0.9999^9765 = 38 % of the initial weights.
    c.optim.ema_warmup = True

    c.train.steps = 100 * 50_000 // 512   # 100 epochs, per block (matched compute)
    c.train.log_every = 100
    c.train.ckpt_every = 2000

    c.sample = dict(grid_points=50, solver="euler", grid_kind="cdf", guidance=2.0, per_class=10)
    return c
