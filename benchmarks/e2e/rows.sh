#!/usr/bin/env bash
# One e2e workload for several KV formats, each in its own process, rows appended to $OUT/e2e.jsonl.
#   bash benchmarks/e2e/rows.sh WORKLOAD PER_RUN_TIMEOUT_S CONFIG...      CONFIG = BACKEND:KV_DTYPE
# (MODEL=benchmarks/e2e/models/NAME: another architecture; BENCH_FLAGS="--steps --eager": extra bench.py flags;
#  RUN="commit abc1234, nvidia-h200": the rows' key)
# e.g. bash benchmarks/e2e/rows.sh cap 240 FLASH_ATTN:auto FLASH_ATTN:fp8 TRITON_ATTN:int4_per_token_head AUTO:kvmix-k4v2
# WORKLOAD longctx runs benchmarks/e2e/longctx.py (prefill at 32k / 120k, TPOT at 1 x 128k and 4 x 100k); the
# others benchmarks/e2e/bench.py.
set -u
wl=$1; limit=$2; shift 2
model=${MODEL:-benchmarks/e2e/models/llama-3.1-8b}
out=${OUT:-.}
script=benchmarks/e2e/bench.py; args=$wl
if [ "$wl" = longctx ]; then script=benchmarks/e2e/longctx.py; args=; fi
for cfg in "$@"; do
  backend=${cfg%%:*}; kvd=${cfg#*:}
  start=$(date +%s)
  timeout "$limit" python3 $script "$model" "$backend" "$kvd" $args --out "$out/e2e.jsonl" ${BENCH_FLAGS:-} \
    > "$out/log-$(basename $model)-$wl-$kvd.txt" 2>&1
  rc=$?
  echo "$wl $cfg rc=$rc $(( $(date +%s) - start ))s $(grep '^RESULT' "$out/log-$(basename $model)-$wl-$kvd.txt" | tail -1)"
  if [ $rc -ne 0 ]; then tail -5 "$out/log-$(basename $model)-$wl-$kvd.txt"; fi
done
