#!/usr/bin/env bash
# The accelerator benchmark suite, in parts that each fit in ten minutes,
# in order of priority:
#
#   bash bench/all.sh train     DiT-XL/2 training MFU at 256 (profiled) and
#                               512, and DiT-XL/2 sampling throughput with
#                               and without feature caching
#   bash bench/all.sh kernels   local attention vs dense (cuDNN) and masked;
#                               selective scan (splits 1 vs auto); linear
#                               attention; host time to trace models
#                               with kernels
#   bash bench/all.sh lamamba   LaMamba-Diff-XL vs DiT-XL/2, training and
#                               sampling at 256 and 512
#   bash bench/all.sh mixers    every mixer family vs attention in DiT-B/2's
#                               blocks (depth 4) at 1024 and 4096 tokens
#
# Results: one JSON line per measurement appended to $OUT/results.jsonl
# (OUT defaults to bench_out/), each command's full output in $OUT/*.log,
# the DiT-XL/2 profile under $OUT/profile_xl2_256 with its summary in the
# log. Every command has its own time limit, so one that hangs costs only
# its share. Needs jdit's dependencies importable (on a machine without
# package access, carry the ml_collections wheel).
set -u
part=${1:?usage: bash bench/all.sh train|kernels|lamamba|mixers}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import ml_collections, flax, optax" || {
  echo "missing dependencies: pip install -e . (or carry the wheels)"; exit 2; }
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu \
  --format=csv 2>/dev/null || true

# run NAME LIMIT_SECONDS CMD...: JSON lines to results.jsonl, all to NAME.log
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep '^{' "$OUT/$name.log" >>"$OUT/results.jsonl"
  grep '^{' "$OUT/$name.log" | cut -c1-400
  echo "   rc=$rc, $((SECONDS - start)) s"
  [ $rc -eq 0 ] || tail -5 "$OUT/$name.log"
}

case $part in
  train)
    run xl2_256 240 python3 bench/train_step.py --model DiT-XL/2 \
      --image_size 256 --batch_size 256 --dtype bfloat16 \
      --profile "$OUT/profile_xl2_256"
    grep -A40 '^traced span' "$OUT/xl2_256.log" | head -45
    run xl2_512 170 python3 bench/train_step.py --model DiT-XL/2 \
      --image_size 512 --batch_size 64 --dtype bfloat16 --remat full \
      --matmul_size 0
    run xl2_sample_256 150 python3 bench/sampling.py --model DiT-XL/2 \
      --image_size 256 --batch_size 64 --steps 50 --cache_interval 3
    ;;
  lamamba)
    for res in 256 512; do
      batch=$([ $res = 256 ] && echo 256 || echo 64)
      run "lamamba_xl_train_$res" 130 python3 bench/train_step.py \
        --model LaMamba-Diff-XL --image_size $res --batch_size $batch \
        --dtype bfloat16 --matmul_size 0
      for model in LaMamba-Diff-XL DiT-XL/2; do
        run "sample_${model//\//}_$res" 70 python3 bench/sampling.py \
          --model $model --image_size $res --batch_size 32 --steps 25
      done
    done
    ;;
  mixers)
    # Depth 4 keeps 24 compilations inside the limit; the per-block ratio
    # is what the families change.
    run mixers 550 python3 bench/mixers.py --model DiT-B/2 --depth 4 \
      --resolutions 512,1024
    ;;
  kernels)
    run attention 280 python3 bench/attention.py
    run scan 170 python3 bench/scan.py --iters 10
    run linear_attention 120 python3 bench/linear_attention.py
    run trace 90 python3 bench/trace.py
    ;;
  *)
    echo "unknown part $part: train, kernels, lamamba or mixers"; exit 2 ;;
esac
echo "results: $OUT/results.jsonl"
