r"""The paper's masked-diffusion setting (Table 3): MD4 on text8, 12 layers, hidden 768, 12 heads, sequence length
256, B=3, gamma=0.05, AdamW lr 3e-4, weight decay 0.03, 2,000 warm-up steps, batch 256 (docs/method.md §4.3).
For accelerators; text8 must be on disk first (see dblocks/text.py: `~/data/text8` or --config.data.path).

  python -m experiments.train --config experiments/configs/text8_mdm.py --workdir runs/text8_mdm
  python -m experiments.train --config experiments/configs/text8_mdm.py --workdir runs/text8_mdm_e2e \
      --config.method=e2e
  python -m experiments.compare --config experiments/configs/text8_mdm.py --workdir runs/compare_text8_mdm

Steps: the paper trains 100 epochs of the 90M-character train split: 351,562 windows of 256 at batch 256 are
1,373 steps per epoch, 137,300 steps for 100 epochs (the default below); each block runs as many steps as the
baseline (matched compute). Not stated in the paper, chosen here: cosine decay after the warm-up, EMA 0.9999,
gradient clipping 1.0, t_min 1e-3.
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "mdm"
    c.data.name = "text8"
    c.data.path = ""           # the text8 file or its folder ('' = $DBLOCKS_TEXT8 or ~/data/text8)
    c.data.seq_len = 256
    c.data.batch_size = 256

    c.model = dict(**model_defaults(), num_layers=12, hidden=768, heads=12, mlp_ratio=4.0, dropout=0.0)
    c.mdm = dict(schedule="linear", t_min=1e-3)

    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05

    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.03
    c.optim.schedule = "cosine"
    c.optim.ema_decay = 0.9999

    c.train.steps = 137_300
    c.train.log_every = 500
    c.train.ckpt_every = 5000

    # The whole test split (19,531 windows of 256), 6 stratified t each (2 per block).
    c.eval = dict(t_per_sequence=6, max_sequences=0, batch_size=256)
    c.sample = dict(grid_points=256, num=8, temperature=1.0)
    return c
