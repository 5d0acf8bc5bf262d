r"""Autoregressive character LM on Shakespeare: a causal transformer as B=4 DiffusionBlocks vs the same transformer
trained as an ordinary causal LM (the end-to-end baseline). CPU-sized (about 10 minutes per method on 2 cores).

  python -m experiments.train --config experiments/configs/shakespeare_ar.py --workdir runs/shakespeare_ar
  python -m experiments.train --config experiments/configs/shakespeare_ar.py --workdir runs/shakespeare_ar_e2e \
      --config.method=e2e
  python -m experiments.sample --workdir runs/shakespeare_ar --out samples.txt --prompt "HAMLET." --max_tokens 300
  python -m experiments.compare --config experiments/configs/shakespeare_ar.py --workdir runs/compare_shakespeare_ar

Each block trains `train.steps` steps, as many as the baseline (matched steps; a block runs L/B layers over 2T rows).
Paper settings kept: B=4, gamma=0.1 (text). Scaled down: 8 layers, hidden 128. Not the paper's (each measured, see
the comments below and docs/language_models.md): the analytic likelihood term with matched sigma_data, the previous
token in the noisy row, the prior head (each block's network predicts the next-token prior, the posterior is exact),
and the ancestral sampler on three levels instead of one Euler step per block.
"""
from dblocks.config import base_config, model_defaults


def get_config(arg=None):
    c = base_config()
    c.task = "ar"
    c.data.name = "shakespeare"
    c.data.seq_len = 64
    c.data.batch_size = 32
    c.data.tokenizer = ""

    # target_norm 0.25: rows of E of norm 0.25 (orthogonal, 0.35 apart) instead of the scale contract's
    # sigma_data*sqrt(128) = 5.7. With 5.7 the token is readable from z for any sigma below ~3, i.e. in most of
    # the log-normal's mass, and the low-noise blocks learn to copy z; at 0.25 each block's range still hides part
    # of it. The measured results (README, docs/language_models.md) use this value; it was not swept here.
    c.model = dict(**model_defaults(), num_layers=8, hidden=128, heads=4, mlp_ratio=4.0, target_dim=0, target_norm=0.25, target_seed=0,
                   likelihood=True, match_sigma_data=True, prev_token=True, lm_head="prior", loss_chunk=0, ar_layout="2t")
    # prev_token: noisy row i also reads token i-1 (known context). Without it the row's residual stream starts from
    # noise and a 2-layer block spends a layer fetching the previous token by attention; with it block 0 alone (the
    # first call) went from 3.55 to 2.87 bits/char and the ELBO from 3.32 to 3.04 on the validation works
    # (docs/language_models.md, "Results").
    # likelihood + match_sigma_data (docs/language_models.md, "Results"): the analytic term <z, E>/sigma^2 in the
    # logits makes each block's optimum a next-token LM plus an exact term, so the ELBO is finite and tight (3.34
    # bits/char on the test works at 400 steps per block, against hundreds without it) and the sampler's read-out
    # equals the ELBO within 0.01 bits. Without them (the paper's head) the low-noise block's bound diverges.
    # lm_head="prior": the network reads no z and is trained by the CE of its own logits (the next-token prior); the
    # posterior prior + likelihood term is exact for it. Same optimum as the posterior's CE, but the low-noise blocks
    # get a full gradient where z already gives the token away: ELBO 3.027 -> 2.831 and sampler 2.875 -> 2.839
    # bits/char on the test works (400 steps per block, mean of 2 seeds; docs/language_models.md, "Results").

    c.blocks.num_blocks = 4
    c.blocks.gamma = 0.1
    c.edm.loss_weighting = "none"     # measured against edm and clamped: docs/language_models.md

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.01
    c.optim.ema_decay = 0.0

    c.train.steps = 800
    c.train.log_every = 100
    c.train.ckpt_every = 500
    c.train.sample_at_end = True
    c.train.plot_at_end = True

    c.blocks.sigma_floor = 0.0
    # sampler: the ancestral chain (a token drawn at every call, z moved on the Gaussian bridge: exact for exact
    # posteriors at any number of steps), the token drawn from the last call's softmax. Grid [80, 0.45, 0.2]: three
    # calls, blocks 0, 1 and 2, chosen on the validation works with the prior head (sampler bits 2.816 for
    # [80, 0.45], 2.786 for [80, 0.45, 0.2], 2.837 for [80, 0.45, 0.2, 0.12], 2.947 / 3.286 for 6 / 8 levels into the
    # band; docs/language_models.md). Block 3 (sigma below 0.13) is not called: by then z has fixed the token and the
    # last call's softmax would be nearly one-hot. On the test works this grid gives 2.839 bits/char (mean of 2 seeds),
    # below the first call (2.859), with a per-draw entropy of 2.1 bits.
    c.sample = dict(grid_points=0, grid="80,0.45,0.2", sigma_end=0.0, solver="ancestral", bridge="sample",
                    temperature=1.0,
                    top_p=0.95, greedy=False, num_samples=4, max_tokens=300)
    c.eval = dict(num_draws=32, max_windows=512, batch_size=64, num_samples=32, max_tokens=200, prompt_len=32,
                  elbo_sigmas=32)
    return c
