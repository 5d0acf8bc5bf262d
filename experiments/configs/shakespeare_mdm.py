r"""The CPU demo of masked diffusion: a small MD4 character model on Shakespeare as B=3 DiffusionBlocks, and its
end-to-end baseline, each about 10 minutes on 2 CPU cores (measured by the compare command below on a shared 2-core
machine: 718 s for the three blocks at 7.7-11.3 steps/s, 651 s for the baseline at 2.5 steps/s; 2000 steps per unit).
lr 2e-3 sits between 1e-3 and 3e-3, which did about equally in 300-step trial runs of the baseline (masked-token CE 2.99
and 2.93 nats); 6e-3 was worse (3.22).

  python -m experiments.train --config experiments/configs/shakespeare_mdm.py --workdir runs/shakespeare_mdm
  python -m experiments.train --config experiments/configs/shakespeare_mdm.py --workdir runs/shakespeare_mdm_e2e \
      --config.method=e2e
  python -m experiments.compare --config experiments/configs/shakespeare_mdm.py --workdir runs/compare_shakespeare_mdm

Matched compute: each block trains `train.steps` steps on L/B layers, as many as the baseline does on all L layers.
Test split: whole works (Hamlet, the Sonnets, The Tempest, Henry V), never seen in training.
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "mdm"
    c.data.name = "shakespeare"
    c.data.seq_len = 64
    c.data.batch_size = 32

    c.model = dict(**model_defaults(), num_layers=6, hidden=128, heads=4, mlp_ratio=4.0, dropout=0.0)
    c.mdm = dict(schedule="linear", t_min=1e-3)

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.03
    c.optim.ema_decay = 0.0

    c.train.steps = 2000
    c.train.log_every = 100
    c.train.ckpt_every = 500

    # ELBO: 2048 test windows spread over the whole test split, 6 stratified t per window (2 per block).
    c.eval = dict(t_per_sequence=6, max_sequences=2048, batch_size=64)
    c.sample = dict(grid_points=64, num=8, temperature=1.0)
    return c
