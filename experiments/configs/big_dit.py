r"""A 1.8B-parameter DiT as B=4 DiffusionBlocks on Fashion-MNIST: a model whose end-to-end training step does not fit
a 24 GiB machine (parameters + gradients + Adam state alone are 16 bytes x 1.8e9 = 29 GB), trained block by block on
one (docs/memory_at_scale.md).

  python -m experiments.memory --config experiments/configs/big_dit.py            # compile only: e2e vs block
  for K in 0 1 2 3; do
    python -m experiments.train --config experiments/configs/big_dit.py --workdir runs/big_dit --config.blocks.train=$K
  done
  python -m experiments.sample --workdir runs/big_dit --out big_dit_samples.png

The layer shape is the paper's DiT (AdaLN-Zero, MLP 4x) scaled to hidden 2048, 24 layers, 16 heads: 1.8B
parameters, 6 layers (about 0.45B) per block. Each block is its own process, so only one block's parameters and
Adam state are ever in memory. Patches of 14 on 28x28 give 4 tokens per image and the batch is 2, so that a block
step (about 3.6 GFLOP per token: 8 x 0.45B with the remat forward) takes seconds on a shared 2-core CPU. This is a
demonstration that the memory claim holds at 1B+ scale, where parameters, gradients and Adam state are the step's
memory whatever the batch; it is not a recipe for good samples (100 steps per block give noise and blobs).

EMA is off (ema_decay 0): an average costs another 4 bytes per parameter (1.8 GB per block, 7.2 GB end to end) and
over 100 steps it would mostly remember the initialisation.
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
    c.data.batch_size = 2

    c.model = dict(**model_defaults(), num_layers=24, hidden=2048, heads=16, patch=14, mlp_ratio=4.0, dropout=0.0,
                   class_dropout=0.1)
    c.model.scan_layers = True
    c.model.remat = "full"

    c.blocks.num_blocks = 4
    c.blocks.gamma = 0.05

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.0

    c.train.steps = 100
    c.train.log_every = 5
    c.train.ckpt_every = 100
    c.train.keep_checkpoints = 1
    c.train.sample_at_end = False   # sample once all blocks exist: experiments.sample (loads the 4 blocks' weights)

    c.sample = dict(grid_points=8, solver="euler", grid_kind="cdf", guidance=2.0, per_class=2)
    return c
