r"""The CPU demo of masked diffusion: a small MD4 character model on Shakespeare as B=3 DiffusionBlocks, and its
end-to-end baseline (each about 10 minutes on 2 CPU cores; steps measured at about 0.5 s end-to-end, 0.15 s per
block step on a busy 2-core machine).

  python -m experiments.train --config experiments/configs/shakespeare_mdm.py --workdir runs/shakespeare_mdm
  python -m experiments.train --config experiments/configs/shakespeare_mdm.py --workdir runs/shakespeare_mdm_e2e \
      --config.method=e2e
  python -m experiments.compare --config experiments/configs/shakespeare_mdm.py --workdir runs/compare_shakespeare_mdm

Matched compute: each block trains `train.steps` steps on L/B layers, as many as the baseline does on all L layers.
Test split: whole works (Hamlet, the Sonnets, The Tempest, Henry V), never seen in training.
"""
from dblocks.config import base_config


def get_config(arg=None):
    c = base_config()
    c.task = "mdm"
    c.data.name = "shakespeare"
    c.data.seq_len = 64
    c.data.batch_size = 32

    c.model = dict(num_layers=6, hidden=128, heads=4, mlp_ratio=4.0, dropout=0.0)
    c.mdm = dict(schedule="linear", t_min=1e-3)

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.03
    c.optim.ema_decay = 0.0

    c.train.steps = 1000
    c.train.log_every = 100
    c.train.ckpt_every = 500

    # ELBO: 2048 test windows spread over the whole test split, 6 stratified t per window (2 per block).
    c.eval = dict(t_per_sequence=6, max_sequences=2048, batch_size=64)
    c.sample = dict(steps=64, num=8, temperature=1.0)
    return c
