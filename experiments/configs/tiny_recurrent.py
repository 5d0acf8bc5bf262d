r"""A tiny recurrent-depth model on synthetic words, for tests.

  python -m experiments.train --config experiments/configs/tiny_recurrent.py --workdir /tmp/tiny_rec
"""
from dblocks.config import model_defaults
from experiments.configs import tiny_ar


def get_config(arg=None):
    c = tiny_ar.get_config()
    c.task = "recurrent"
    c.model = dict(**model_defaults(), num_layers=3, prelude=1, core=1, coda=1, hidden=16, heads=2, mlp_ratio=2.0,
                   target_dim=0, target_norm=0.0, target_seed=0,
                   likelihood=False, match_sigma_data=False, prev_token=False, lm_head="posterior", loss_chunk=0)
    c.blocks.num_blocks = 1
    c.recurrent = dict(mean_iterations=4, backprop_iterations=2, init_std=1.0, noisy_prelude=False)
    c.sample.grid_points = 0   # 0 = recurrent.mean_iterations Euler steps
    return c
