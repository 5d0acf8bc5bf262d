r"""Compiled training-step memory over model size, end to end against one block, for B = 1, 2, 4, 8 (compile only).

  python -m experiments.memory_scale --out docs/lab/results/scale            # both families, every size, all rows
  python -m experiments.memory_scale --family dit --sizes 0,1 --variants _remat --out /tmp/scale
  python -m experiments.memory_scale --report docs/lab/results/scale --plot docs/images/memory_scale.png

Families (dblocks.memory_scale): 'dit' scales experiments/configs/cifar10_dit.py, 'lm' scales
experiments/configs/lm1b_ar.py (stand-in vocabulary of 32,000 tokens); sizes index dblocks.memory_scale.LADDER.
Each (family, size) is written to OUT/<family>_h<hidden>_l<layers>.json as soon as it is measured, and a size whose
file exists gets only the rows (variants, B) it lacks, so an interrupted sweep resumes and a new variant is added to
the files of an earlier one. --report prints the Markdown tables of the files in a
directory; --plot draws total step memory against parameter count.
"""
import glob
import json
import os

from absl import flags

from dblocks import logs
from dblocks.config import ConfigError
from dblocks import memory_scale as ms
from experiments.common import run_main
from experiments.configs import cifar10_dit, lm1b_ar

FAMILIES = {"dit": (cifar10_dit.get_config, None), "lm": (lm1b_ar.get_config, ms.LM_VOCAB)}
GIB = 2 ** 30
TITLES = {"dit": "DiT family", "ar": "LM family"}   # by config task
VARIANT_TITLES = {"": "", "_remat": " + remat", "_remat_chunked": " + remat + chunked (attention, layer_chunk "
                  f"{ms.LAYER_CHUNK})"}

_OUT = flags.DEFINE_string("out", None, "directory of the per-size JSON files (written one size at a time)")
_FAMILY = flags.DEFINE_list("family", ["dit", "lm"], "families to sweep: dit, lm")
_SIZES = flags.DEFINE_list("sizes", None, "indices into dblocks.memory_scale.LADDER (default: all)")
_BLOCKS = flags.DEFINE_list("blocks", [str(b) for b in ms.BLOCKS], "numbers of blocks B")
_BATCH = flags.DEFINE_integer("batch_size", ms.BATCH_SIZE, "batch of every row (images or sequences)")
_VARIANTS = flags.DEFINE_list("variants", list(ms.VARIANTS), "row variants (dblocks.memory_scale.VARIANTS; '' is "
                              "the model as configured, '_remat' scanned layers + full remat, '_remat_chunked' also "
                              "chunked attention and layers)")
_REPORT = flags.DEFINE_string("report", None, "print the Markdown tables of this directory's results instead")
_PLOT = flags.DEFINE_string("plot", None, "with --report: also write the plot to this PNG")


def _usage_problems() -> list[str]:
    p = [f"--family {f!r}: choose from {sorted(FAMILIES)}" for f in _FAMILY.value if f not in FAMILIES]
    p += [f"--variants {v!r}: choose from {list(ms.VARIANTS)}" for v in _VARIANTS.value if v not in ms.VARIANTS]
    try:
        sizes = [int(s) for s in (_SIZES.value or [])]
        blocks = [int(b) for b in _BLOCKS.value]
    except ValueError:
        return p + ["--sizes and --blocks take comma-separated integers"]
    if _BATCH.value < 1:
        p.append(f"--batch_size {_BATCH.value}: must be >= 1")
    p += [f"--sizes {s}: indices 0..{len(ms.LADDER) - 1}" for s in sizes if not 0 <= s < len(ms.LADDER)]
    p += [f"--blocks {b}: must divide every depth of the ladder" for b in blocks
          if b < 1 or any(s.layers % b for s in ms.LADDER)]
    if not (_OUT.value or _REPORT.value):
        p.append("give --out DIR (measure) or --report DIR (tables)")
    return p


def load_results(directory: str) -> list[dict]:
    """Every size file of a directory, by family then parameter count."""
    rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(directory, "*.json")))]
    return sorted(rows, key=lambda r: (r["family"], r["params"]))


def markdown(results: list[dict], variant: str = "_remat", detail: int = 4) -> str:
    """One table per family: parameters, the e2e step (state | temporaries | total, GiB), per B the block step's
    total and its ratio to e2e, and the state and temporaries of the block step at B = detail."""
    out = []
    for family in sorted({r["family"] for r in results}):
        rs = [r for r in results if r["family"] == family and "e2e" + variant in r]
        if not rs:
            continue
        bs = sorted({int(b) for r in rs for b in r["blocks"]})
        head = "| params | H x L | e2e state | e2e temps | e2e total | " + " | ".join(
            f"B={b} block total (ratio)" for b in bs) + f" | B={detail} block state | B={detail} block temps |"
        out += [f"**{family}{VARIANT_TITLES[variant]}** (GiB; batch {rs[0]['batch_size']})", "", head,
                "|" + "---|" * (7 + len(bs))]
        for r in rs:
            e = r["e2e" + variant]
            cells = []
            for b in bs:
                blk = r["blocks"].get(str(b), {})
                cells.append(f"{blk['block' + variant]['total_bytes'] / GIB:.2f} ({blk['ratio' + variant]:.3f})"
                             if "block" + variant in blk else "-")
            d = r["blocks"].get(str(detail), {}).get("block" + variant)
            cells += [f"{d['state_bytes'] / GIB:.2f}", f"{d['temp_bytes'] / GIB:.2f}"] if d else ["-", "-"]
            out.append(f"| {r['params'] / 1e6:,.0f}M | {r['hidden']} x {r['layers']} | {e['state_bytes'] / GIB:.2f} | "
                       f"{e['temp_bytes'] / GIB:.2f} | {e['total_bytes'] / GIB:.2f} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(results: list[dict], path: str) -> str:
    """Total step memory against parameter count (log-log): e2e + remat and block + remat per B (solid), the same
    with chunked attention and layers where measured (dashed), a line at 24 GiB."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = sorted({r["family"] for r in results})
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 5), squeeze=False)
    for ax, family in zip(axes[0], families):
        rs = [r for r in results if r["family"] == family and "e2e_remat" in r]
        x = [r["params"] for r in rs]
        for variant, style, marker in (("_remat", "-", "o"), ("_remat_chunked", "--", "s")):
            name = VARIANT_TITLES[variant]
            pts = [(r["params"], r["e2e" + variant]["total_bytes"] / GIB) for r in rs if "e2e" + variant in r]
            if pts:
                ax.plot(*zip(*pts), "k" + style + marker, label="end-to-end" + name)
            for b in sorted({int(b) for r in rs for b in r["blocks"]}):
                pts = [(r["params"], r["blocks"][str(b)]["block" + variant]["total_bytes"] / GIB) for r in rs
                       if "block" + variant in r["blocks"].get(str(b), {})]
                if pts:
                    ax.plot(*zip(*pts), style + marker, color=f"C{b.bit_length() - 1}", label=f"one block{name}, B={b}")
        ax.axhline(24, color="r", lw=1)
        ax.text(x[0], 24 * 1.1, "24 GiB", color="r")
        ax.set(xscale="log", yscale="log", xlabel="parameters (whole network)", ylabel="compiled step memory (GiB)",
               title=f"{TITLES.get(family, family)}: training-step memory, batch {rs[0]['batch_size']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv):
    del argv
    logs.setup()
    problems = _usage_problems()
    if problems:
        raise ConfigError("; ".join(problems))   # exit status 2, before anything is compiled
    if _REPORT.value:
        results = load_results(_REPORT.value)
        for variant in _VARIANTS.value:
            print(markdown(results, variant))
        if _PLOT.value:
            print(plot(results, _PLOT.value))
        return
    os.makedirs(_OUT.value, exist_ok=True)
    sizes = [ms.LADDER[int(s)] for s in (_SIZES.value or range(len(ms.LADDER)))]
    variants = {v: ms.VARIANTS[v] for v in _VARIANTS.value}
    for family in _FAMILY.value:
        get_config, vocab = FAMILIES[family]
        for size in sizes:
            path = os.path.join(_OUT.value, f"{family}_h{size.hidden}_l{size.layers}.json")
            done = json.load(open(path)) if os.path.exists(path) else None
            r = ms.size_report(get_config(), size, [int(b) for b in _BLOCKS.value], variants, _BATCH.value, vocab,
                               done)
            if r == done:
                logs.log.info("%s has every row asked for: skipped", path)
                continue
            with open(path + ".tmp", "w") as f:
                json.dump(r, f, indent=1)
            os.replace(path + ".tmp", path)
            logs.log.info("%s: %s params, B=4 ratios %s", path, f"{r['params']:,}",
                          {k: v for k, v in r["blocks"].get("4", {}).items() if k.startswith("ratio")})


if __name__ == "__main__":
    run_main(main)
