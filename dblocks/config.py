"""Config defaults and validation: a bad config is refused with every problem listed, before anything compiles."""
from __future__ import annotations

import math

import ml_collections

from dblocks import edm as edm_lib
from dblocks import partition as partition_lib
from dblocks import profiling, run_record, validation
from dblocks.models import options as model_options
from dblocks.tasks import TASK_NAMES, get_task
from dblocks.tasks.base import METHODS


class ConfigError(ValueError):
    """The config cannot be run; the message lists every problem found."""


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every experiment; a config file fills in task, data and model."""
    c = ml_collections.ConfigDict()
    c.task = ""
    c.method = "dblocks"          # 'dblocks' (block-wise) or 'e2e' (the end-to-end baseline)
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(name="", path="", data_dir="", batch_size=128,
                                            # your own data without a test / validation split: the fractions of it
                                            # held out (validation: None = the dataset's default, docs/data.md)
                                            test_fraction=0.1,
                                            val_fraction=ml_collections.config_dict.placeholder(float)))

    c.edm = ml_collections.ConfigDict(dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, p_mean=-1.2,
                                           p_std=1.2, loss_weighting="edm", max_weight=10.0))

    c.blocks = ml_collections.ConfigDict()
    c.blocks.num_blocks = 3
    c.blocks.gamma = 0.05
    c.blocks.partition = "equiprobable"   # or 'loguniform' (the paper's ablation baseline)
    c.blocks.layers = ""                  # '' = even split; e.g. '2,4,6' layers per block (block 0 first)
    c.blocks.train = "all"                # which blocks this process trains: 'all', '1', '0,2'

    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, warmup_steps=100,
                                             schedule="cosine", min_lr_ratio=0.0, grad_clip=1.0, ema_decay=0.0,
                                             ema_warmup=True))   # EMA decay min(ema_decay, (1+t)/(10+t))

    c.train = ml_collections.ConfigDict(dict(steps=1000, log_every=100, ckpt_every=500, keep_checkpoints=2,
                                             ckpt_every_secs=0.0,   # also a checkpoint every N seconds (0 = off)
                                             sample_at_end=True, plot_at_end=True,
                                             # resume a unit with a config that changes the result (recorded in
                                             # its meta.json; refused otherwise: docs/reliability.md)
                                             allow_config_change=False))
    c.train.profile_steps = ""   # 'a,b': a jax.profiler trace of steps a..b in WORKDIR/profile/ (dblocks.profiling)
    c.train.eval_every = 500     # each unit's held-out loss every N steps, at a log point (0 = off; dblocks.validation)
    # gradient accumulation: each step's batch in this many microbatches, one optimizer update (docs/training.md);
    # the memory preflight compiles a unit's step before training and refuses one that cannot fit
    # (memory_limit_gb: the device's memory, 0 = ask the device / the host's available memory)
    c.train.update(dict(microbatches=1, preflight=True, memory_limit_gb=0.0))

    # How the units are trained (docs/scale_out.md): 'auto' (the default: 'mesh' with several GPUs / TPUs and several
    # blocks to train, else 'sequential'; dblocks.parallel.auto_mode), 'sequential' (one after another, one device) or
    # 'mesh' (up to `blocks` same-shape blocks at once on a ('block', 'data') mesh, each block's batch split `data`
    # ways; 0 = as many blocks as the devices allow). cpu_devices (CPU backend only; ignored on GPU / TPU): split the
    # host CPU into this many JAX devices and each step's batch over them; with mode 'sequential' the units then train
    # one at a time on a (1 block x cpu_devices) mesh. Faster steps on a multi-core CPU (docs/training.md).
    c.parallel = ml_collections.ConfigDict(dict(mode="auto", data=1, blocks=0, cpu_devices=1))
    return c


def model_defaults() -> dict:
    """How every model computes (dblocks.models.options), the same defaults in every config file so each can be
    overridden from the command line: scan_layers (one compiled layer under nn.scan), remat (none / full / dots /
    narrow / a jax.checkpoint_policies name), dtype (float32 / bfloat16 compute; parameters and loss stay float32),
    attention (xla / cudnn / einsum / chunked), attention_chunk (query rows per chunk of 'chunked'), mlp_chunk
    (rows per MLP chunk, 0: off), layer_chunk (samples per chunk of each layer, 0: off)."""
    return dict(model_options.DEFAULTS)


def parse_blocks(spec: str, num_blocks: int) -> list[int]:
    """'all' | '1' | '0,2' -> sorted block indices; raises ValueError on anything else."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_blocks))
    try:
        blocks = sorted({int(v) for v in spec.split(",") if v.strip() != ""})
    except ValueError:
        raise ValueError(f"blocks.train={spec!r}: use 'all' or block indices such as '1' or '0,2'") from None
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if not blocks or bad:
        raise ValueError(f"blocks.train={spec!r}: indices must be in 0..{num_blocks - 1}")
    return blocks


POSITIVE_MODEL_FIELDS = ("hidden", "heads", "patch", "mlp_ratio", "core")
FRACTION_MODEL_FIELDS = ("dropout", "class_dropout")


def _nan_fields(c, prefix: str = "") -> list[str]:
    """Dotted names of float fields that are NaN (every comparison with NaN is False, so range checks miss it)."""
    out = []
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict) or isinstance(v, dict):
            out += _nan_fields(v, f"{prefix}{k}.")
        elif isinstance(v, float) and math.isnan(v):
            out.append(f"{prefix}{k}")
    return out


def _model_problems(c) -> list[str]:
    """Range checks of the model fields several tasks share, run before any task's own checks divide by them."""
    m = c.get("model") or {}
    p = []
    for k in POSITIVE_MODEL_FIELDS:
        if k in m and not (isinstance(m[k], (int, float)) and m[k] > 0):
            p.append(f"model.{k}={m[k]!r} must be > 0")
    for k in FRACTION_MODEL_FIELDS:
        if k in m and not (isinstance(m[k], (int, float)) and 0 <= m[k] < 1):
            p.append(f"model.{k}={m[k]!r} must be in [0, 1)")
    return p


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range_problems(c) -> list[str]:
    """Ranges of the numeric fields every task shares (each field's allowed values; the cross-field rules follow)."""
    e, o, t, d = c.edm, c.optim, c.train, c.data
    checks = [  # (name, value, allowed, description)
        ("seed", c.seed, isinstance(c.seed, int) and 0 <= c.seed < 2 ** 32, "an integer in [0, 2**32)"),
        ("edm.sigma_max", e.sigma_max, _finite(e.sigma_max), "finite"),
        ("edm.sigma_data", e.sigma_data, _finite(e.sigma_data), "finite"),
        ("edm.p_mean", e.p_mean, _finite(e.p_mean), "finite"),
        ("edm.p_std", e.p_std, _finite(e.p_std), "finite"),
        ("edm.max_weight", e.max_weight, _finite(e.max_weight) and e.max_weight > 0, "> 0 and finite"),
        # beyond 10 every block already covers the whole range; much larger overflows exp()
        ("blocks.gamma", c.blocks.gamma, _finite(c.blocks.gamma) and 0 <= c.blocks.gamma <= 10, "in [0, 10]"),
        ("optim.b1", o.b1, _finite(o.b1) and 0 <= o.b1 < 1, "in [0, 1)"),
        ("optim.b2", o.b2, _finite(o.b2) and 0 <= o.b2 < 1, "in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, _finite(o.weight_decay) and o.weight_decay >= 0, ">= 0"),
        ("optim.grad_clip", o.grad_clip, _finite(o.grad_clip) and o.grad_clip >= 0, ">= 0 (0 = no clipping)"),
        ("optim.min_lr_ratio", o.min_lr_ratio, _finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        ("train.keep_checkpoints", t.keep_checkpoints, isinstance(t.keep_checkpoints, int)
         and t.keep_checkpoints >= 1, "an integer >= 1 (the final checkpoint must stay)"),
        ("train.ckpt_every_secs", t.get("ckpt_every_secs", 0), _finite(t.get("ckpt_every_secs", 0))
         and t.get("ckpt_every_secs", 0) >= 0, ">= 0 (0 = off)"),
    ]
    # sizes a user dataset decides are 0 until dblocks.user_data fills them in ('folder:', 'npz:', 'hf:' names)
    lowest = 0 if ":" in str(d.get("name", "")) else 1
    for k in ("image_size", "channels", "num_classes", "seq_len"):
        if k in d:
            checks.append((f"data.{k}", d[k], isinstance(d[k], int) and d[k] >= lowest, f"an integer >= {lowest}"))
    return [f"{name}={value!r} must be {what}" for name, value, ok, what in checks if not ok]


def _generic_problems(c) -> list[str]:
    p = [f"{k}=nan must be a number" for k in _nan_fields(c)]
    if p:
        return p
    p += _range_problems(c) + _model_problems(c)
    for old, new in run_record.RENAMED_FIELDS.items():
        section, field = old.split(".")
        if section in c and field in c[section]:
            p.append(f"{old} is now called {new} (the same number, under the name every task uses): set {new}")
    if c.task not in TASK_NAMES:
        p.append(f"task={c.task!r} is unknown; choose one of {TASK_NAMES}")
    if c.method not in METHODS:
        p.append(f"method={c.method!r} is unknown; choose one of {METHODS}")
    L, B = int(c.model.num_layers), int(c.blocks.num_blocks)
    if L < 1:
        p.append(f"model.num_layers={L} must be >= 1")
    if B < 1:
        p.append(f"blocks.num_blocks={B} must be >= 1")
    elif B > L:
        p.append(f"blocks.num_blocks={B} is larger than model.num_layers={L}: every block needs a layer")
    elif c.blocks.layers:
        try:
            layers = [int(v) for v in str(c.blocks.layers).split(",")]
        except ValueError:
            layers = None
            p.append(f"blocks.layers={c.blocks.layers!r} must be comma-separated integers")
        if layers is not None and (len(layers) != B or sum(layers) != L or min(layers) < 1):
            p.append(f"blocks.layers={c.blocks.layers!r} must give {B} positive counts summing to {L}")
    elif L % B:
        p.append(f"model.num_layers={L} is not divisible by blocks.num_blocks={B}; set blocks.layers "
                 f"(e.g. '{','.join(str(L // B + (i < L % B)) for i in range(B))}') to split unevenly")
    if c.blocks.partition not in partition_lib.PARTITION_KINDS:
        p.append(f"blocks.partition={c.blocks.partition!r}; choose one of {partition_lib.PARTITION_KINDS}")
    if B >= 1:
        try:
            parse_blocks(c.blocks.train, B)
        except ValueError as e:
            p.append(str(e))
    e = c.edm
    if not (e.sigma_min > 0 and e.sigma_max > 0 and e.sigma_min < e.sigma_max):
        p.append(f"edm.sigma_min={e.sigma_min} must be > 0 and < edm.sigma_max={e.sigma_max}")
    if e.sigma_data <= 0 or e.p_std <= 0:
        p.append(f"edm.sigma_data={e.sigma_data} and edm.p_std={e.p_std} must be > 0")
    if e.loss_weighting not in edm_lib.LOSS_WEIGHTINGS:
        p.append(f"edm.loss_weighting={e.loss_weighting!r}; choose one of {edm_lib.LOSS_WEIGHTINGS}")
    o, t = c.optim, c.train
    if not (o.lr > 0 and math.isfinite(o.lr)):
        p.append(f"optim.lr={o.lr} must be a positive number")
    if o.schedule not in ("cosine", "constant"):
        p.append(f"optim.schedule={o.schedule!r}; choose 'cosine' or 'constant'")
    if not 0 <= o.ema_decay < 1:
        p.append(f"optim.ema_decay={o.ema_decay} must be in [0, 1)")
    if t.steps < 1:
        p.append(f"train.steps={t.steps} must be >= 1")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        p.append(f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps={t.steps}]")
    elif o.schedule == "cosine" and o.warmup_steps >= t.steps:
        p.append(f"optim.warmup_steps={o.warmup_steps} must be < train.steps={t.steps} with optim.schedule='cosine' "
                 f"(no steps would be left to decay over)")
    if c.data.batch_size < 1:
        p.append(f"data.batch_size={c.data.batch_size} must be >= 1")
    if t.ckpt_every < 1 or t.log_every < 1:
        p.append("train.ckpt_every and train.log_every must be >= 1")
    p += profiling.config_problems(t) + validation.config_problems(t)
    return p + model_options.validate_options(c.model) + _parallel_problems(c) + _train_problems(c)


def _train_problems(c) -> list[str]:
    """train.microbatches (absent in configs saved before it existed: 1) and the memory preflight's fields."""
    t, p = c.train, []   # the field types are enforced by ConfigDict (an int, a float, a bool)
    k, bs = int(t.get("microbatches", 1)), int(c.data.batch_size)
    if k < 1:
        p.append(f"train.microbatches={k} must be >= 1 (1: the whole batch at once)")
    elif bs % k:
        p.append(f"data.batch_size={bs} must be divisible by train.microbatches={k}")
    elif k > 1:
        q = c.get("parallel") or {}
        cpus = q.get("cpu_devices", 1)
        ways, what = ((int(q.get("data", 1)), "parallel.data") if q.get("mode", "sequential") == "mesh"
                      else (int(cpus), "parallel.cpu_devices"))
        if ways > 1 and (bs // k) % ways:
            p.append(f"data.batch_size={bs} must be divisible by train.microbatches={k} x {what}={ways}: each "
                     f"microbatch of {bs // k} is split evenly over the {ways} devices")
    if float(t.get("memory_limit_gb", 0.0)) < 0:
        p.append(f"train.memory_limit_gb={t.memory_limit_gb} must be >= 0 (0: the device's own memory)")
    return p


PARALLEL_MODES = ("auto", "sequential", "mesh")


def _parallel_problems(c) -> list[str]:
    """config.parallel (absent in configs saved before it existed: then sequential)."""
    if "parallel" not in c:
        return []
    q, p = c.parallel, []
    if q.mode not in PARALLEL_MODES:
        p.append(f"parallel.mode={q.mode!r}; choose one of {PARALLEL_MODES}")
    if int(q.data) < 1 or int(q.blocks) < 0:
        p.append(f"parallel.data={q.data} must be >= 1 and parallel.blocks={q.blocks} >= 0 (0: as many as fit)")
    elif q.mode in ("mesh", "auto") and int(c.data.batch_size) % int(q.data):
        p.append(f"data.batch_size={c.data.batch_size} must be divisible by parallel.data={q.data}: each block's "
                 f"batch is split evenly over its data group")
    cpus = q.get("cpu_devices", 1)
    if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
        p.append(f"parallel.cpu_devices={cpus!r} must be an integer >= 1 (1: the host CPU is one device)")
    elif cpus > 1 and q.mode in ("sequential", "auto") and int(c.data.batch_size) % cpus:
        p.append(f"data.batch_size={c.data.batch_size} must be divisible by parallel.cpu_devices={cpus}: each "
                 f"step's batch is split evenly over the CPU devices")
    return p


def validate(config) -> None:
    """Raises ConfigError listing every problem; checks the task's own fields when the generic ones pass."""
    problems = _generic_problems(config)
    if not problems:
        try:
            problems += get_task(config).validate()
        except (ArithmeticError, ValueError, TypeError, KeyError, AttributeError) as e:
            # the task's checks assume the generic ones; a field they still trip over is a config problem too
            problems.append(f"the {config.task!r} task's checks failed on this config: {type(e).__name__}: {e}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


# -- what each field means (--help_config) ----------------------------------------------------------------------------

FIELD_HELP = {
    "task": "what is trained: dit, vit, mdm, ar or recurrent",
    "method": "'dblocks' (block-wise) or 'e2e' (the end-to-end baseline)",
    "seed": "seed of every random draw (per-block keys are fold_in(seed, b))",
    "data.name": "dataset: built-in name, tfds:<name>, folder:<path>, hf:<name> or a text file (docs/data.md)",
    "data.path": "where a built-in dataset's files are ('' = its default place)",
    "data.data_dir": "tfds data directory ('' = tfds' default)",
    "data.batch_size": "examples per training step (each block and the baseline)",
    "data.image_size": "image side in pixels (0 = from the data)",
    "data.channels": "image channels (0 = from the data)",
    "data.num_classes": "classes (0 = from the data)",
    "data.class_names": "comma-separated class names for sample grids ('' = the data's or numbers)",
    "data.test_fraction": "share held out as the test split when the data has none",
    "data.val_fraction": "share of train held out as validation when the data has none (None = the dataset's default)",
    "data.flip": "random horizontal flips in training",
    "data.randaugment_ops": "RandAugment operations per training image (0 = off)",
    "data.randaugment_magnitude": "RandAugment magnitude, 0 to 30",
    "data.seq_len": "tokens per training window",
    "data.tokenizer": "SentencePiece model for tfds:, text:, jsonl: or hf: text; train:VOCAB trains one ('' = chars)",
    "edm.sigma_min": "lowest noise level",
    "edm.sigma_max": "highest noise level",
    "edm.sigma_data": "data standard deviation of the EDM preconditioning",
    "edm.p_mean": "mean of log sigma in training (log-normal)",
    "edm.p_std": "standard deviation of log sigma in training",
    "edm.loss_weighting": "'edm' (lambda per sample), 'none', or 'clamped' (lambda capped at max_weight)",
    "edm.max_weight": "cap of lambda for the clamped weighting",
    "blocks.num_blocks": "B: blocks the network is cut into",
    "blocks.gamma": "overlap of neighbouring blocks' noise ranges, in log space",
    "blocks.partition": "'equiprobable' (equal probability per block) or 'loguniform'",
    "blocks.layers": "layers per block, block 0 first, e.g. '2,4,6' ('' = an even split)",
    "blocks.train": "blocks this process trains: 'all', '1', '0,2'",
    "blocks.sigma_floor": "lowest sigma any block trains on (0 = edm.sigma_min)",
    "optim.lr": "peak learning rate (AdamW)",
    "optim.weight_decay": "AdamW weight decay",
    "optim.b1": "Adam beta1",
    "optim.b2": "Adam beta2",
    "optim.warmup_steps": "linear warm-up steps",
    "optim.schedule": "learning-rate schedule after warm-up: 'cosine' or 'constant'",
    "optim.min_lr_ratio": "final learning rate as a fraction of the peak",
    "optim.grad_clip": "global gradient-norm clip (0 = off)",
    "optim.ema_decay": "EMA decay of the weights used for sampling (0 = no EMA)",
    "optim.ema_warmup": "EMA decay min(ema_decay, (1+t)/(10+t))",
    "train.steps": "steps per unit (each block, or the baseline)",
    "train.log_every": "steps between log lines",
    "train.ckpt_every": "steps between checkpoints",
    "train.ckpt_every_secs": "also a checkpoint every N seconds (0 = off)",
    "train.keep_checkpoints": "checkpoints kept per unit (>= 1)",
    "train.allow_config_change": "resume a unit with a config that changes the result (recorded in its meta.json)",
    "train.microbatches": "gradient accumulation: each step's batch in this many microbatches, one update",
    "train.preflight": "compile each unit's step first and refuse one that cannot fit the device (exit 2)",
    "train.memory_limit_gb": "the memory the preflight compares with (0 = the device's, or the host's available)",
    "train.profile_steps": "'a,b': a jax.profiler trace of steps a..b in WORKDIR/profile/ ('' = off)",
    "train.eval_every": "held-out loss of each unit every N steps, at a log point (0 = off)",
    "train.sample_at_end": "write samples when training ends",
    "train.plot_at_end": "plot the loss curves when training ends",
    "parallel.mode": "'sequential' (units one after another) or 'mesh' (same-shape blocks side by side)",
    "parallel.data": "devices each block's batch is split over (mesh)",
    "parallel.blocks": "blocks side by side on the mesh (0 = as many as fit)",
    "parallel.cpu_devices": "split the host CPU into this many devices, the batch over them (CPU only)",
    "model.num_layers": "L: layers of the whole network",
    "model.hidden": "model width",
    "model.heads": "attention heads",
    "model.patch": "image patch side",
    "model.mlp_ratio": "MLP width as a multiple of hidden",
    "model.dropout": "dropout rate in training",
    "model.class_dropout": "share of labels dropped to the null class (classifier-free guidance)",
    "model.scan_layers": "layers under nn.scan (one compiled layer, stacked parameters)",
    "model.remat": "rematerialisation: none, full, dots, narrow or a jax.checkpoint_policies name",
    "model.dtype": "compute dtype: float32 or bfloat16 (parameters and loss stay float32)",
    "model.attention": "attention implementation: xla, cudnn, einsum or chunked (O(T) memory, pure JAX)",
    "model.attention_chunk": "query rows per chunk of the chunked attention",
    "model.mlp_chunk": "rows per chunk of every layer's MLP, each chunk rematerialised (0 = off)",
    "model.layer_chunk": "samples per chunk of every layer's whole computation, each rematerialised (0 = off)",
    "model.out_conv": "DiT: kernel size of a convolution after unpatchify (0 = none, the paper's DiT)",
    "model.ar_layout": "AR block rows: '2t' ([clean ; noisy]) or 't' (the prior head only: one causal sequence)",
    "model.target_dim": "width of the fixed target embedding E (0 = model.hidden)",
    "model.target_norm": "norm of each row of E (0 = sigma_data * sqrt(target_dim))",
    "model.target_seed": "seed of E's rows",
    "model.match_sigma_data": "take sigma_data from E's rows (the scale contract)",
    "model.likelihood": "add the analytic likelihood term <z, E>/sigma^2 to the logits",
    "model.prev_token": "the noisy row also reads the previous token",
    "model.lm_head": "'posterior' (the network reads z) or 'prior' (next-token prior + likelihood term)",
    "model.loss_chunk": "rows per chunk of the chunked cross-entropy (0 = the whole logits)",
    "model.prelude": "recurrent model: layers before the core",
    "model.core": "recurrent model: layers of the repeated core",
    "model.coda": "recurrent model: layers after the core",
    "recurrent.mean_iterations": "mean core iterations per token",
    "recurrent.backprop_iterations": "core iterations the baseline backpropagates through",
    "recurrent.init_std": "standard deviation of the recurrent state's initial noise",
    "recurrent.noisy_prelude": "the noisy row also runs the prelude (DiffusionBlocks only)",
    "mdm.schedule": "masking schedule of masked diffusion",
    "mdm.t_min": "lowest masking time",
    "sample.grid_points": "noise levels (masking times for mdm) at which a block is called: block calls per sample "
                          "with Euler (language tasks: 0 = one per block)",
    "sample.grid_kind": "sigma grid: 'cdf' (equal CDF, the paper's) or 'karras'",
    "sample.grid": "language tasks: explicit noise levels, e.g. '80,0.45,0.2' ('' = the CDF grid)",
    "sample.sigma_end": "language tasks: where the chain stops (0 = sigma_min)",
    "sample.solver": "ODE solver: euler, heun, dpmpp_2m (ancestral: language tasks)",
    "sample.bridge": "language tasks: logits to target space, 'softmax' or 'sample'",
    "sample.guidance": "classifier-free guidance scale",
    "sample.per_class": "images per class in a sample grid",
    "sample.temperature": "softmax temperature of the drawn token",
    "sample.top_p": "nucleus sampling threshold",
    "sample.greedy": "take the most likely token",
    "sample.num": "samples written at the end of training",
    "sample.num_samples": "samples written at the end of training",
    "sample.max_tokens": "tokens generated per sample",
    "eval.batch_size": "evaluation batch size",
    "eval.num_draws": "chain draws averaged per scored position",
    "eval.max_windows": "held-out windows scored",
    "eval.num_samples": "generated samples judged",
    "eval.max_tokens": "tokens generated per judged sample",
    "eval.prompt_len": "prompt tokens of each judged sample",
    "eval.elbo_sigmas": "noise levels of the ELBO's quadrature",
    "eval.max_sequences": "held-out sequences scored",
    "eval.t_per_sequence": "masking times per sequence of the ELBO estimate",
}


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field of `config` as the task reads it (its defaults filled in), with its value and meaning: one line
    each, `section.field = value  # meaning`."""
    full = get_task(config).config
    lines = []

    def walk(node, prefix):
        for k in sorted(node.keys()):
            v = node[k]
            if isinstance(v, ml_collections.ConfigDict):
                walk(v, f"{prefix}{k}.")
            else:
                name = prefix + k
                meaning = FIELD_HELP.get(name, "a field of this config file")
                lines.append(f"{name} = {v!r}  # {meaning}")
    walk(full, "")
    return "\n".join(lines)
