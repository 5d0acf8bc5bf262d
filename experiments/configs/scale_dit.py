r"""A small DiT for the scale-out benchmark: 8 layers as B blocks on a ('block', 'data') mesh; synthetic 28x28 data.

  python -m experiments.lab.bench_parallel --config experiments/configs/scale_dit.py --cpu_devices 8
  python -m experiments.lab.bench_parallel --config experiments/configs/scale_dit.py:4,2 --cpu_devices 8  # B=4, data 2
  python -m experiments.train --config experiments/configs/scale_dit.py --workdir runs/scale --config.parallel.mode=mesh

The argument is 'B,data' (default '8,1'): B blocks side by side, each block's batch split over `data` devices.
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    blocks, data = (int(v) for v in (arg or "8,1").split(","))
    c = base_config()
    c.task = "dit"
    c.data.name = "synthetic"
    c.data.image_size = 28
    c.data.channels = 1
    c.data.num_classes = 10
    c.data.flip = False
    c.data.batch_size = 64

    c.model = dict(**model_defaults(), num_layers=8, hidden=128, heads=4, patch=4, mlp_ratio=4.0,
                   dropout=0.0, class_dropout=0.1)

    c.blocks.num_blocks = blocks
    c.blocks.gamma = 0.05

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.train.steps = 200
    c.train.log_every = 50
    c.train.ckpt_every = 100
    c.train.sample_at_end = False

    c.parallel.mode = "mesh"
    c.parallel.data = data
    c.sample = dict(grid_points=16, solver="euler", grid_kind="cdf", guidance=2.0, per_class=4)
    return c
