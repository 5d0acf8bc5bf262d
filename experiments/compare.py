r"""Trains the DiffusionBlocks run and the end-to-end baseline of one config at matched compute, evaluates both,
and writes a side-by-side table and plots.

  python -m experiments.compare --config experiments/configs/fashion_mnist_vit.py --workdir runs/cmp_vit
  python -m experiments.compare --config experiments/configs/fashion_mnist_dit.py --workdir runs/cmp_dit \
      --num_samples 2000 --config.train.steps=1000

WORKDIR/dblocks and WORKDIR/e2e hold the two runs (same seed; each block gets train.steps, the baseline
train.steps: the paper's matched compute). Outputs: WORKDIR/compare.md (Markdown table: metric, training wall
time, compiled step memory, inference block calls), WORKDIR/compare.json, WORKDIR/compare_loss.png (loss curves per
block and for the baseline) and, when the evaluation has 'per_step', WORKDIR/compare_per_step.png. Running it again
resumes unfinished training and re-evaluates; finished runs keep their measured training time. Task-agnostic: the
metric comes from `run.task.evaluate` (dblocks/tasks/base.py), options as in experiments.evaluate.

Both runs are evaluated on the validation split by default (--split=validation): compare while choosing settings,
then once with --split=test for the figure you report, choosing nothing by it (docs/data.md, "Splits"). The split is
checked before anything trains; data without a validation split (Fashion-MNIST unless data.val_fraction > 0) is
refused with what to do.

Language tasks (ar, recurrent) also train capacity-matched references (experiments/lm_compare.py; --opt
references=False skips them, --opt reference_seeds=N sets how many L/B-layer LMs) and a judge: an L-layer plain LM
with another seed (WORKDIR/judge, trained on the train split like the others), which is neither contestant. It
scores both methods' samples (gen_ppl_e2e) and gives MAUVE's features; the n-gram judge (gen_ppl_ngram, fitted on
the train split) is the other neutral one. compare.json's 'lm' block has stable keys (elbo_bits, first_call_bits,
sampler_bits, final_entropy_bits, ref_e2e_bits, ref_shallow_bits, ref_ensemble_bits, and per protocol mauve,
gen_ppl_ngram, ...).
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time

from absl import flags
from ml_collections import config_flags

from dblocks import checkpoint as ckpt_lib
from dblocks import config as config_lib
from dblocks import logs, memory, paths
from dblocks import train as train_lib
from dblocks.data import DatasetMissingError
from dblocks.tasks import get_task
from experiments.common import run_main
from experiments import lm_compare
from dblocks.evaluation import evaluate_workdir
from experiments.options import define_option_flags

METHODS = ("dblocks", "e2e")
LABELS = {"dblocks": "DiffusionBlocks", "e2e": "end-to-end"}
TIME_FILE = "train_time.json"
JUDGE_DIR = "judge"
JUDGE_SEED_OFFSET = 1000   # the judge's seed: the comparison's + this (its own initialisation and data order)


def _complete(task, method: str, workdir: str) -> bool:
    for u in task.units(method):
        path = os.path.join(workdir, u.subdir(), ckpt_lib.META)
        if not os.path.exists(path) or not ckpt_lib.read_json(path).get("complete"):
            return False
    return True


def train_timed(config, workdir: str) -> dict:
    """Trains (or resumes) one method's run; returns {'seconds': training wall time (compiles and checkpoint
    writes included), 'resumed': bool}. A run finished earlier keeps its recorded time."""
    task = get_task(config)
    time_file = os.path.join(workdir, TIME_FILE)
    previous = ckpt_lib.read_json(time_file) if os.path.exists(time_file) else None
    if previous is not None and _complete(task, config.method, workdir):
        logs.log.info("[%s] already trained (%.0f s); not retraining", config.method, previous["seconds"])
        return previous
    t0 = time.perf_counter()
    train_lib.train(config, workdir)
    seconds = time.perf_counter() - t0 + (previous or {}).get("seconds", 0.0)
    record = {"seconds": round(seconds, 1), "resumed": previous is not None}
    ckpt_lib.write_json_atomic(time_file, record)
    return record


def steps_per_second(workdir: str) -> dict[str, float]:
    """Mean logged training rate per unit (compile excluded), from WORKDIR/metrics.jsonl."""
    rates: dict[str, list[float]] = {}
    for r in logs.read_metrics(workdir):
        v = r.get("steps_per_s")
        if v is not None and v == v:
            rates.setdefault(r["unit"], []).append(v)
    return {u: sum(v) / len(v) for u, v in rates.items()}


def judge_config(config):
    """The judge of generated text: the comparison's L-layer plain LM (method e2e) with another seed."""
    c = config.copy_and_resolve_references()
    c.method, c.seed = "e2e", int(config.seed) + JUDGE_SEED_OFFSET
    return c


def check_split(config, split: str) -> None:
    """Refuses (the source's DataError, exit status 2), before anything trains, a split the data does not have."""
    src = get_task(config).source(split)
    if len(src) == 0:
        raise DatasetMissingError(f"the {split} split of {config.data.name} is empty")


def compare(config, workdir: str, options: dict | None = None, command: str = "") -> dict:
    """The whole comparison; returns what compare.json holds. options['split']: the evaluation split (default
    'validation'; 'test' for the figure to report)."""
    config_lib.validate(config)
    options = {"split": "validation", **(options or {})}
    check_split(config, options["split"])
    runs = {}
    # Train both before evaluating either: some evaluations read the other run (the text tasks score the
    # DiffusionBlocks samples under the end-to-end model of the same comparison).
    for method in METHODS:
        cfg = config.copy_and_resolve_references()
        cfg.method = method
        wd = os.path.join(workdir, method)
        logs.log.info("=== %s: training into %s", LABELS[method], wd)
        runs[method] = {"workdir": wd, "train": train_timed(cfg, wd), "steps_per_s": steps_per_second(wd)}
    lm = config.task in lm_compare.LM_TASKS
    if lm and options.get("references", True):   # capacity-matched plain LMs (experiments/lm_compare.py)
        lm_compare.train_references(config, workdir, train_timed, options.get("reference_seeds"))
    eval_options = {k: v for k, v in options.items() if k not in ("references", "reference_seeds")}
    if lm and "e2e_workdir" not in eval_options:   # a judge that is neither contestant scores both methods' text
        judge_wd = os.path.join(workdir, JUDGE_DIR)
        logs.log.info("=== judge: plain LM, seed %d, into %s", int(config.seed) + JUDGE_SEED_OFFSET, judge_wd)
        train_timed(judge_config(config), judge_wd)
        eval_options["e2e_workdir"] = judge_wd
    for method in METHODS:
        logs.log.info("=== %s: evaluating", LABELS[method])
        runs[method]["eval"] = evaluate_workdir(runs[method]["workdir"], method=method, **eval_options)
    mem = memory.memory_report(get_task(config))
    result = {"config": config.to_dict(), "task": config.task, "command": command, "options": options,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "memory": mem, "runs": runs}
    if lm:
        refs = lm_compare.reference_bits(config, workdir, eval_options) if options.get("references", True) else {}
        result["lm"] = lm_compare.summary(runs, refs)
    result["plots"] = {"loss": plot_losses(workdir), "per_step": plot_per_step(workdir, runs)}
    ckpt_lib.write_json_atomic(os.path.join(workdir, "compare.json"), result)
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(markdown(result))
    return result


# -- the table -----------------------------------------------------------------------------------------------------

def _calls_unit(ev: dict) -> str:
    return "token" if "block_calls_per_token" in ev else "sample"


def _calls(ev: dict) -> int:
    return ev.get("block_calls_per_token", ev.get("block_calls_per_sample"))


def _mib(b) -> str:
    return f"{b / 2**20:.1f}"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    """The Markdown table of compare.md."""
    c, mem = result["config"], result["memory"]
    d, e = result["runs"]["dblocks"], result["runs"]["e2e"]
    B, steps = int(c["blocks"]["num_blocks"]), int(c["train"]["steps"])
    head = d["eval"]["headline"]
    arrow = "higher is better" if head["higher_is_better"] else "lower is better"

    def rate(r):
        return ", ".join(f"{v:.2f}" for _, v in sorted(r["steps_per_s"].items()))

    rows = [
        (f"{head['name']} ({arrow})", _fmt(head["value"]), _fmt(e["eval"]["headline"]["value"])),
        ("training steps", f"{B} blocks x {steps}", f"{steps}"),
        ("training wall time (s)", f"{d['train']['seconds']:.0f}", f"{e['train']['seconds']:.0f}"),
        ("training steps/s per unit", rate(d), rate(e)),
        ("compiled step memory (MiB)", f"{_mib(mem['block_step_bytes'])} (largest block)",
         _mib(mem["e2e_step_bytes"])),
        ("parameters per unit (MiB)", _mib(mem["block"]["params_bytes"]), _mib(mem["e2e"]["params_bytes"])),
        (f"inference block calls per {_calls_unit(d['eval'])}", str(_calls(d["eval"])), str(_calls(e["eval"]))),
    ]
    if "layer_evals_per_sample" in d["eval"]:
        rows.append(("layer evaluations per sample", str(d["eval"]["layer_evals_per_sample"]),
                     str(e["eval"].get("layer_evals_per_sample", ""))))
    dg, eg = d["eval"].get("generation") or {}, e["eval"].get("generation") or {}
    if "gen_ppl" in dg or "gen_ppl" in eg:
        rows.append(("perplexity of samples under the judge (a separate LM)", _fmt(dg.get("gen_ppl", "")),
                     _fmt(eg.get("gen_ppl", ""))))
    if "distinct_1" in dg:
        rows.append(("samples: distinct-1 / repetition-3", f"{dg['distinct_1']:.3f} / {dg.get('repetition_3', 0):.3f}",
                     f"{eg.get('distinct_1', 0):.3f} / {eg.get('repetition_3', 0):.3f}"))
    if "seconds_per_image" in d["eval"]:
        rows.append(("sampling seconds per image", f"{d['eval']['seconds_per_image']:.4f}",
                     f"{e['eval']['seconds_per_image']:.4f}"))
    split = result.get("options", {}).get("split", "test")
    lines = [f"### {result['task']}: DiffusionBlocks (B={B}) vs end-to-end", "",
             f"Config `{c['data']['name']}`, {c['model']['num_layers']} layers, seed {c['seed']}, "
             f"batch {c['data']['batch_size']}; {result['machine']}; {result['date']}. Evaluated on the **{split}** "
             f"split{' (for choosing settings)' if split == 'validation' else ''}.", "",
             f"| | DiffusionBlocks (B={B}) | end-to-end |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {cc} |" for a, b, cc in rows]
    if "lm" in result:
        lines += lm_compare.markdown(result["lm"], B)
    lines += ["", f"Compiled step memory: XLA's memory analysis of one training step (arguments + outputs + "
                  f"temporaries), batch {mem['batch_size']}; block / end-to-end = {mem['ratio']:.3f} "
                  f"(ideal 1/B = {1 / B:.3f}). Wall time includes compilation and checkpoint writes."]
    if result["command"]:
        lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


# -- the plots -----------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(workdir: str) -> str | None:
    """Training loss per block (DiffusionBlocks) and for the baseline, on one axis (dblocks.logs.plot_losses)."""
    records = [{**r, "label": f"{LABELS[m]}: {r['unit']}" if m == "dblocks" else LABELS[m]}
               for m in ("dblocks", "e2e") for r in logs.read_metrics(os.path.join(workdir, m))]
    return logs.plot_losses(workdir, out=os.path.join(workdir, "compare_loss.png"), records=records)


def plot_per_step(workdir: str, runs: dict) -> str | None:
    """The metric after each inference step (eval 'per_step'); a run without one is drawn as a flat line."""
    if not any("per_step" in r["eval"] for r in runs.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    name = ""
    for method, r in runs.items():
        ev = r["eval"]
        if "per_step" in ev:
            vals, name = ev["per_step"]["values"], ev["per_step"]["name"]
            ax.plot(range(1, len(vals) + 1), vals, "o-", label=LABELS[method])
        else:
            ax.axhline(ev["headline"]["value"], ls="--", color="gray", label=f"{LABELS[method]} (final)")
    ax.set(xlabel="inference step (block call)", ylabel=name or "metric")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(workdir, "compare_per_step.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv):
    del argv
    logs.setup()
    command = " ".join(["python -m experiments.compare", *sys.argv[1:]])
    result = compare(_CONFIG.value, _WORKDIR.value, {**_OPTIONS(), "split": _SPLIT.value}, command=command)
    print(markdown(result))


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "where both runs, the table and the plots go")
    _OPTIONS = define_option_flags()
    _SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"],
                               "evaluation split: validation while choosing settings, test for the reported figure")
    flags.mark_flags_as_required(["config", "workdir"])
    paths.refuse_remote_flags(_WORKDIR)
    run_main(main)
