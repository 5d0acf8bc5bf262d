r"""The CPU demo: a small DiT as B=3 DiffusionBlocks on Fashion-MNIST (about 10 minutes on 2 CPU cores).

  python -m experiments.train --config experiments/configs/fashion_mnist_dit.py --workdir runs/fmnist_dit
  python -m experiments.train --config experiments/configs/fashion_mnist_dit.py --workdir runs/fmnist_dit_e2e \
      --config.method=e2e
  python -m experiments.sample --workdir runs/fmnist_dit --out grid.png

Each block trains `train.steps` steps, as many as the end-to-end baseline (the paper's matched compute).
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "dit"
    c.data.name = "fashion_mnist"
    c.data.image_size = 28
    c.data.channels = 1
    c.data.num_classes = 10
    c.data.flip = False
    c.data.batch_size = 64

    c.model = dict(**model_defaults(), num_layers=6, hidden=128, heads=4, patch=4, mlp_ratio=2.0,
                   dropout=0.0, class_dropout=0.1,
                   out_conv=3)  # a 3x3 convolution after unpatchify: no visible 4x4 patch grid (docs/classification.md)

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.01
    c.optim.ema_decay = 0.995

    c.train.steps = 2000
    c.train.log_every = 200
    c.train.ckpt_every = 500

    # DPM-Solver++(2M) on the Karras grid, 10 block calls: chosen on the validation split (docs/lab/solvers.md)
    c.sample = dict(grid_points=10, solver="dpmpp_2m", grid_kind="karras", guidance=2.0, per_class=10)
    return c
