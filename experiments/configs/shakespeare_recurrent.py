r"""Recurrent-depth (Huginn-style) character LM on Shakespeare: the baseline with random depth (mean K=8) and
truncated backprop through the last 2 iterations, vs DiffusionBlocks (B=1: the whole network as one denoiser trained
in a single pass; K=8 Euler steps of core+coda per generated token). CPU-sized (about 10 minutes per method).

  python -m experiments.train --config experiments/configs/shakespeare_recurrent.py --workdir runs/shakespeare_rec
  python -m experiments.train --config experiments/configs/shakespeare_recurrent.py \
      --workdir runs/shakespeare_rec_e2e --config.method=e2e
  python -m experiments.sample --workdir runs/shakespeare_rec --out samples.txt --prompt "HAMLET." --max_tokens 300
  python -m experiments.compare --config experiments/configs/shakespeare_recurrent.py \
      --workdir runs/compare_shakespeare_recurrent

Paper (Huginn on LM1B): 2 prelude, 4 core, 2 coda layers, mean 32 iterations, 8-step truncated backprop; here the
same shape scaled down by 2 in layers and 4 in iterations: 1 / 2 / 1 layers, mean 8 iterations, backprop through 2.
"""
from dblocks.config import model_defaults
from experiments.configs import shakespeare_ar


def get_config(arg=None):
    c = shakespeare_ar.get_config()
    c.task = "recurrent"
    c.model = dict(**model_defaults(), num_layers=4, prelude=1, core=2, coda=1, hidden=128, heads=4, mlp_ratio=4.0,
                   target_dim=0, target_norm=0.25, target_seed=0,    # as shakespeare_ar (see there)
                   likelihood=False, match_sigma_data=False, prev_token=False, lm_head="posterior", loss_chunk=0)
    c.blocks.num_blocks = 1
    c.blocks.gamma = 0.0
    c.recurrent = dict(mean_iterations=8, backprop_iterations=2, init_std=1.0)
    c.sample.grid_points = 0   # 0 = recurrent.mean_iterations Euler steps per token
    c.sample.grid = ""   # its own grid and sampler until measured (shakespeare_ar's are for B=4)
    c.sample.solver = "euler"
    c.sample.bridge = "softmax"
    c.train.steps = 1000
    return c
