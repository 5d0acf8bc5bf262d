"""Compiled decoding (dblocks.tasks.lm.decode) draws exactly the tokens of the Python loop (dblocks.textgen.generate,
the reference) for the same seed: DiffusionBlocks with Euler, Heun and the ancestral solver with the 'sample' bridge,
the plain causal LM, the recurrent DiffusionBlocks model and the Huginn baseline, temperature / top-p and greedy,
past the end of the window (the re-prefilled window agrees too). Untrained, randomised parameters of the tiny
configs: every code path, no training."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks import textgen
from dblocks.tasks.lm import decode as lm_decode
from experiments.configs import tiny_ar, tiny_recurrent
from dblocks.assemble import random_run

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROMPTS = np.array([[1, 2, 3, 4, 9, 10, 11, 12], [5, 6, 7, 8, 13, 14, 15, 16], [3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
NEW = 13   # prompt 8 + 13 > t_max 16: the window is re-prefilled from its last half once


@pytest.fixture(scope="module")
def runs():
    return {("ar", m): random_run(tiny_ar.get_config(), m) for m in ("dblocks", "e2e")} | \
           {("recurrent", m): random_run(tiny_recurrent.get_config(), m) for m in ("dblocks", "e2e")}


def _both(run, seed=7, **options):
    smp = run.task.sampler_options(run, **options)
    fast, calls = run.task.generate(run, PROMPTS, NEW, seed, smp)
    slow, _ = run.task.generate(run, PROMPTS, NEW, seed, smp, compiled=False)
    return fast, slow, calls


CASES = [
    (("ar", "dblocks"), dict()),                                         # config: Euler, T=1, top-p 0.95
    (("ar", "dblocks"), dict(greedy=True)),
    (("ar", "dblocks"), dict(grid="80,0.45,0.1", solver="heun", top_p=1.0)),
    (("ar", "dblocks"), dict(grid="80,0.45,0.2,0.1", solver="ancestral", bridge="sample", temperature=0.8)),
    (("ar", "dblocks"), dict(grid="80,0.45", solver="ancestral", bridge="sample")),   # block 1 never called
    (("ar", "e2e"), dict()),
    (("ar", "e2e"), dict(greedy=True)),
    (("recurrent", "dblocks"), dict(greedy=True)),
    (("recurrent", "e2e"), dict()),                                      # Huginn: s_0 per row from fold_in(base, j)
]


@pytest.mark.parametrize("which,options", CASES, ids=lambda v: ".".join(v) if isinstance(v, tuple) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "config")
def test_compiled_decoding_draws_the_python_loops_tokens(runs, which, options):
    fast, slow, calls = _both(runs[which], **options)
    assert fast.shape == (len(PROMPTS), NEW) and fast.dtype == np.int32
    np.testing.assert_array_equal(fast, slow)
    assert len(np.unique(fast)) > 2 or options.get("greedy")   # not a degenerate model: tokens vary
    assert calls >= 1


def test_generation_defaults_to_the_compiled_loop_and_the_seed_matters(runs, monkeypatch):
    run = runs[("ar", "dblocks")]
    a, _ = run.task.generate(run, PROMPTS, NEW, seed=7)
    monkeypatch.setattr(textgen, "generate", lambda *a, **k: pytest.fail("the Python loop ran"))
    b, _ = run.task.generate(run, PROMPTS, NEW, seed=7)
    c, _ = run.task.generate(run, PROMPTS, NEW, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # the uncached decoder has no compiled form: it stays on the Python loop
    assert run.task.decoder(run, 3, use_cache=False).compiled is None
    assert isinstance(run.task.decoder(run, 3).compiled, lm_decode.Compiled)


def test_the_compiled_loop_updates_the_caches_in_place(runs):
    """No cache-sized copy inside the loop body: without copy insertion's region analysis (lm_decode._jit) XLA
    copied every cache once or twice per token, which cost the LM about a third of its decoding time."""
    run = runs[("ar", "e2e")]
    smp = run.task.sampler_options(run)
    dec = run.task.decoder(run, len(PROMPTS), smp)
    comp = dec.compiled
    seg = comp.segment(dec.t_max, smp.temperature, smp.top_p, smp.greedy)
    state = lm_decode._carry(dec.prefill(PROMPTS))
    cache = state["cache"][0][0]
    hlo = seg.lower(comp.params, state, jax.random.PRNGKey(0), jnp.int32(0), jnp.int32(4),
                    jnp.zeros((len(PROMPTS), dec.t_max), jnp.int32)).compile().as_text()
    shape = f"f32[{','.join(str(d) for d in cache.shape)}]"
    computation, in_body = "", 0
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")):
            computation = line.split()[0]
        elif computation != "ENTRY" and " copy(" in line and line.split("=", 1)[1].strip().startswith(shape):
            in_body += 1
    assert in_body == 0, f"{in_body} copies of a cache {shape} inside the decoding loop"


def test_blocks_the_grid_never_calls_keep_no_cache(runs):
    """On a grid whose calls all fall in block 0, block 1's clean rows are never run: its cache is None in the
    decoder's state (prefill and after each token), and the tokens are those of the uncached reference."""
    from dblocks import sampling
    run = runs[("ar", "dblocks")]
    smp = run.task.sampler_options(run, grid="80,0.45")
    assert sampling.blocks_called(smp.grid, run.partition, smp.solver) == [0]
    assert sampling.blocks_called((80.0, 0.45, 0.01), run.partition, "euler") == [0, 1]
    assert sampling.blocks_called((80.0, 0.45), run.partition, "heun") == [0]
    dec = run.task.decoder(run, len(PROMPTS), smp)
    state = dec.prefill(PROMPTS)
    assert state["caches"][1] is None and state["caches"][0] is not None
    state = dec.compiled.append(dec.compiled.params, state, jnp.asarray(PROMPTS[:, 0]))
    assert state["caches"][1] is None
    cached, _ = run.task.generate(run, PROMPTS, 5, 3, smp)
    uncached, _ = run.task.generate(run, PROMPTS, 5, 3, smp, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)


def test_the_decoding_programs_compile_without_ynn_fusions_where_jax_has_the_option(monkeypatch):
    """On the CPU the decoding programs drop YNNPACK's fusions (faster at decoding's small operands); a jax without
    the option gets no option instead of a compile error."""
    lm_decode._cpu_decode_options.cache_clear()
    assert dict(lm_decode._cpu_decode_options()) == lm_decode._CPU_DECODE_OPTIONS
    hlo = lm_decode._jit(lambda a, b: a @ b).lower(jnp.ones((4, 8)), jnp.ones((8, 4))).compile().as_text()
    assert "%ynn_fusion" not in hlo
    default = jax.jit(lambda a, b: a @ b).lower(jnp.ones((4, 8)), jnp.ones((8, 4))).compile().as_text()
    assert "%ynn_fusion" in default
    monkeypatch.setattr(lm_decode, "_CPU_DECODE_OPTIONS", {"xla_cpu_no_such_option_for_this_test": ""})
    lm_decode._cpu_decode_options.cache_clear()
    try:
        assert lm_decode._cpu_decode_options() == ()
        assert float(lm_decode._jit(lambda x: x * 2)(jnp.ones(2))[0]) == 2.0
    finally:
        lm_decode._cpu_decode_options.cache_clear()


@pytest.mark.parametrize("args, message", [
    (["--config", "experiments/configs/cifar100_vit.py"], "decoding speed needs 'ar' or 'recurrent'"),
    (["--config", "experiments/configs/tiny_ar.py", "--batch", "0"], "--batch=0: 0 is not a positive integer"),
    (["--config", "experiments/configs/tiny_ar.py", "--config.model.no_such_field=1"],
     "unknown field --config.model.no_such_field"),
])
def test_decode_speed_refuses_bad_input_with_status_2(args, message):
    """experiments.lab.decode_speed: a clear error and exit status 2 before anything is compiled."""
    proc = subprocess.run([sys.executable, "-m", "experiments.lab.decode_speed", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]
