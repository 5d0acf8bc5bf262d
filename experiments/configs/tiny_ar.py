r"""A tiny autoregressive DiffusionBlocks model on synthetic words, for tests: compiles and trains in seconds.

  python -m experiments.train --config experiments/configs/tiny_ar.py --workdir /tmp/tiny_ar
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "ar"
    c.data.name = "synthetic_text"
    c.data.seq_len = 16
    c.data.batch_size = 8
    c.data.tokenizer = ""

    c.model = dict(**model_defaults(), num_layers=2, hidden=16, heads=2, mlp_ratio=2.0,
                   target_dim=0, target_norm=0.0, target_seed=0, likelihood=False, match_sigma_data=False,
                   prev_token=False, lm_head="posterior", loss_chunk=0, ar_layout="2t")

    c.blocks.num_blocks = 2
    c.blocks.gamma = 0.1
    c.edm.loss_weighting = "clamped"

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.train.steps = 6
    c.train.log_every = 3
    c.train.ckpt_every = 3
    c.train.sample_at_end = False
    c.train.plot_at_end = False

    c.blocks.sigma_floor = 0.0
    c.sample = dict(grid_points=0, grid="", sigma_end=0.0, solver="euler", bridge="softmax", temperature=1.0,
                    top_p=0.95, greedy=False, num_samples=2, max_tokens=8)
    c.eval = dict(num_draws=2, max_windows=8, batch_size=8, num_samples=2, max_tokens=8, prompt_len=4,
                  elbo_sigmas=8)
    return c
