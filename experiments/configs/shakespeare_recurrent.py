r"""Recurrent-depth (Huginn-style) character LM on Shakespeare: the baseline with random depth (mean K=8) and
truncated backprop through the last 2 iterations, vs DiffusionBlocks (B=1: the whole network as one denoiser trained
in a single pass; by default two calls of core+coda per generated token, the ancestral chain on [80, 0.45]; the
paper's K=8 Euler steps with --config.sample.grid= --config.sample.solver=euler --config.sample.bridge=softmax).
CPU-sized (about 10 minutes per method).

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
                   likelihood=True, match_sigma_data=True, prev_token=True, lm_head="prior", loss_chunk=0)
    # As shakespeare_ar: the likelihood term, prev_token and the prior head (measured for this model too:
    # docs/lab/language_models.md, "Why shakespeare_recurrent is set as it is").
    c.blocks.num_blocks = 1
    c.blocks.gamma = 0.0
    # noisy_prelude: the noisy row also runs the prelude (DiffusionBlocks only; the paper leaves the prelude's role
    # open).
    c.recurrent = dict(mean_iterations=8, backprop_iterations=2, init_std=1.0, noisy_prelude=True)
    c.sample.grid_points = 0   # with grid "" : recurrent.mean_iterations points per token
    # the ancestral chain on [80, 0.45]: two calls of the one denoiser (chosen on the validation works)
    c.sample.grid = "80,0.45"
    c.sample.solver = "ancestral"
    c.sample.bridge = "sample"
    c.train.steps = 1000
    return c
