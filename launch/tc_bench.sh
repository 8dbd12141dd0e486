#!/bin/bash
# Emulated slow link: shape the loopback interface (all gloo traffic between the 2 local ranks goes through it).
# Needs root (tc). Run from a source checkout with the package installed. Removes the shaping on exit.
#   launch/tc_bench.sh                      # all three engines
#   launch/tc_bench.sh deepspeed            # one or more of: plain megatron deepspeed deepspeed-pg
set -u
cd "$(dirname "$0")/.."
RATE=${RATE:-2gbit}
WHAT=${*:-plain megatron deepspeed}
tc qdisc add dev lo root tbf rate $RATE burst 4mb limit 256mb
trap 'tc qdisc del dev lo root' EXIT
tc qdisc show dev lo
for w in $WHAT; do
  case $w in
    plain) OMP_NUM_THREADS=1 nexus-megatron bench --nproc 2 --steps 4 --rounds 2 --layouts sequential --no-sharpness \
             --out runs/bench/tc_plain.json ;;
    megatron) PYTHONPATH=. OMP_NUM_THREADS=1 python -m tests.mcore_bench_cpu --nproc 2 --steps 3 --rounds 2 \
             --layouts sequential --no-sharpness --out runs/bench/tc_mcore.json ;;
    # ZeRO-2: overlap on = overlap_comm, and for Nexus nexus.overlap_param_gather (buckets of --bucket-size)
    deepspeed) OMP_NUM_THREADS=1 nexus-megatron bench --nproc 2 --engine deepspeed --zero 2 --steps 4 --rounds 2 \
             --layouts sequential --no-sharpness --out runs/bench/tc_ds_z2.json ;;
    # the parameter all-gather overlap alone: overlap_comm off in both rows, "on" = nexus.overlap_param_gather
    deepspeed-pg) OMP_NUM_THREADS=1 nexus-megatron bench --nproc 2 --engine deepspeed --zero 2 --steps 6 --rounds 3 \
             --layouts sequential --no-sharpness --ds-zero-set overlap_comm=false --out runs/bench/tc_ds_z2_pg.json ;;
    *) echo "unknown engine $w (plain, megatron, deepspeed, deepspeed-pg)"; exit 2 ;;
  esac
done
