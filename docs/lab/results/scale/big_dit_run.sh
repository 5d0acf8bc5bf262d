#!/bin/bash
# trains the 4 blocks of big_dit one process each, then samples the assembled chain
cd /work/wt-scale
for K in 0 1 2 3; do
  echo "block $K start $(date -u +%T)" >> /work/runs/big_dit_logs/progress.txt
  PYTHONPATH=$PWD /usr/bin/time -v /work/main/.venv/bin/python -m experiments.train \
    --config experiments/configs/big_dit.py --workdir /work/runs/big_dit --config.blocks.train=$K \
    > /work/runs/big_dit_logs/block_$K.log 2>&1
  echo "block $K end $(date -u +%T) rc=$?" >> /work/runs/big_dit_logs/progress.txt
done
PYTHONPATH=$PWD /usr/bin/time -v /work/main/.venv/bin/python -m experiments.sample --workdir /work/runs/big_dit \
  --out /work/runs/big_dit/samples.png > /work/runs/big_dit_logs/sample.log 2>&1
echo "sample end $(date -u +%T) rc=$?" >> /work/runs/big_dit_logs/progress.txt
