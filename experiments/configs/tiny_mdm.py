r"""A tiny masked-diffusion LM on synthetic words, for tests: compiles and trains in seconds.

  python -m experiments.train --config experiments/configs/tiny_mdm.py --workdir /tmp/tiny_mdm
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "mdm"
    c.data.name = "synthetic_text"
    c.data.seq_len = 16
    c.data.batch_size = 8

    c.model = dict(**model_defaults(), num_layers=3, hidden=16, heads=2, mlp_ratio=2.0, dropout=0.0)
    c.mdm = dict(schedule="linear", t_min=1e-3)

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.03
    c.train.steps = 6
    c.train.log_every = 3
    c.train.ckpt_every = 3
    c.train.sample_at_end = False
    c.train.plot_at_end = False

    c.eval = dict(t_per_sequence=3, max_sequences=16, batch_size=8)
    c.sample = dict(grid_points=8, num=2, temperature=1.0)
    return c
