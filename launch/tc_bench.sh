#!/bin/bash
# Emulated slow link: shape the loopback interface (all gloo traffic between the 2 local ranks goes through it).
# Needs root (tc). Run from a source checkout with the package installed. Removes the shaping on exit.
set -u
cd "$(dirname "$0")/.."
RATE=${RATE:-2gbit}
tc qdisc add dev lo root tbf rate $RATE burst 4mb limit 256mb
trap 'tc qdisc del dev lo root' EXIT
tc qdisc show dev lo
OMP_NUM_THREADS=1 nexus-megatron bench --nproc 2 --steps 4 --rounds 2 --layouts sequential --no-sharpness \
    --out runs/bench/s3_plain_tc.json
PYTHONPATH=. OMP_NUM_THREADS=1 python -m tests.mcore_bench_cpu --nproc 2 --steps 3 --rounds 2 --layouts sequential \
    --no-sharpness --out runs/bench/s3_mcore_tc.json
