#!/usr/bin/env bash
# One unattended check on a CUDA machine (issue 13), under 8 minutes, ending with one summary table:
#   1. the CUDA-marked tests (pytest -m cuda)
#   2. bench_train_step.py: ResNet50-GeM-512, batch 8 x 8 views, 224 / 448 px, AMP and channels_last
#   3. bench_pipeline.py: the ts_aug data path (both view backends) next to the step's views/s
#   4. bench_eval.py on the device: N = 5,924 and 60,502, CUB- and SOP-like classes
#   5. with two or more GPUs: a 2-process torchrun ts_aug run (NCCL)
# Every step has its own time limit; a failed step is reported and the others still run.
#
#   bash benchmarks/gpu_check.sh            # on the CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu      # dry run of the script itself on a CPU: tiny sizes, CUDA steps skipped
#
# Logs go to $GPU_CHECK_DIR (default: gpu_check_logs/); paste the summary into README.md ("Performance").
set -u
cd "$(dirname "$0")/.."
MODE=cuda
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
LOGS=${GPU_CHECK_DIR:-gpu_check_logs}
mkdir -p "$LOGS"
PY=${PYTHON:-python}
START=$(date +%s)

if [[ $MODE == cuda ]]; then
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
  if [[ "$GPUS" == "0" ]]; then
    echo "gpu_check: torch sees no CUDA device (run with --cpu for a dry run)" >&2
    exit 2
  fi
  GPU_NAME=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
  DEVICE=cuda
  STEP_SIZES=(--image-size 224 --teacher-image-size 448 --batch-size 8 --pos-num 8)
  STEP_ARGS=(--arch tv:resnet50 "${STEP_SIZES[@]}" --amp auto --channels-last on --steps 10 --warmup 3)
  NPROC=$(nproc)
  WORKERS=1,2,4
  if (( NPROC >= 16 )); then WORKERS=1,2,4,8,16; elif (( NPROC >= 8 )); then WORKERS=1,2,4,8; fi
  PIPE_ARGS=(--device cuda --arch tv:resnet50 --workers "$WORKERS" --samples 6 --batches 3 --steps 5)
  EVAL_ARGS=(--device cuda --sizes 5924,60502 --repeats 3)
else
  GPUS=0
  GPU_NAME="none (CPU dry run)"
  DEVICE=cpu
  STEP_ARGS=(--arch tf_efficientnet_lite0 --image-size 32 --teacher-image-size 48 --batch-size 2 --pos-num 2
             --steps 1 --warmup 1 --channels-last off)
  PIPE_ARGS=(--device cpu --image-size 32 --teacher-image-size 48 --pos-num 2 --batch-size 2 --images 6
             --samples 2 --batches 1 --workers 1 --steps 1)
  EVAL_ARGS=(--device cpu --sizes 600 --repeats 1 --threads 1)
fi

declare -a NAMES STATUS ELAPSED FIGURES

run_step() {  # name, time limit (s), log file, command...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$log" 2>&1
  local rc=$?
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="timeout"; elif (( rc != 0 )); then status="failed ($rc)"; fi
  tail -n 25 "$LOGS/$log"
  NAMES+=("$name"); STATUS+=("$status"); ELAPSED+=("$(( $(date +%s) - t0 ))")
}

# 1. CUDA-marked tests
run_step "cuda tests" 60 tests.log $PY -m pytest -q -m cuda tests/test_cuda.py
FIGURES+=("$(grep -Eo '[0-9]+ passed|[0-9]+ failed|[0-9]+ skipped' "$LOGS/tests.log" | paste -sd, -)")

# 2. training step, AMP + channels_last
run_step "train step" 70 train_step.log $PY benchmarks/bench_train_step.py --device $DEVICE "${STEP_ARGS[@]}"
FIGURES+=("$(awk '/^ours/ {o=$3} /^reference/ {r=$3} /speed-up/ {s=$NF} END {printf "ours %s img/s, reference %s img/s, %s", o, r, s}' "$LOGS/train_step.log")")

# 3. input pipeline vs network
run_step "pipeline" 130 pipeline.log $PY benchmarks/bench_pipeline.py "${PIPE_ARGS[@]}"
FIGURES+=("$(awk '/1 process, 1 thread/ {printf "%s %s views/s/worker; ", $1, $6} /^network/ {printf "network %s views/s; ", $NF}
                  /DataLoader/ {best[$1]=$0} END {for (b in best) {split(best[b], f, " "); printf "%s %s workers %s views/s, ratio %s; ", b, f[3], f[5], f[7]}}' "$LOGS/pipeline.log")")

# 4. evaluation on the device
run_step "evaluation" 150 eval.log $PY benchmarks/bench_eval.py "${EVAL_ARGS[@]}"
FIGURES+=("$(awk -F'|' '/^ *[0-9]+ +(cub|sop)/ {split($1, a, " "); split($3, r, " "); split($4, g, " "); printf "N=%s %s %sx %s GB %s; ", a[1], a[2], r[1], g[2], $6}' "$LOGS/eval.log" | tr -s ' ')")

# 5. two GPUs: torchrun, NCCL
if (( GPUS >= 2 )); then
  RUN="$LOGS/ddp-run"
  rm -rf "$RUN" "$LOGS/ddp-teacher"
  TINY=(--student timm:resnet18 --not-pretrained --whitening 64 --image-size 96 --teacher-image-size 128
        --test-datasets "" --logger none --workers 4 --no-val --overwrite)
  run_step "torchrun 2 GPUs" 70 ddp.log bash -c "
    $PY main.py ${TINY[*]@Q} --mode sym --epochs 1 --query-size 256 --directory $LOGS/ddp-teacher &&
    torchrun --standalone --nproc_per_node 2 main.py ${TINY[*]@Q} --mode ts_aug --epochs 1 --query-size 512 \
      --batch-size 16 --pos-num 4 --teacher-path $LOGS/ddp-teacher/model_best.pth --directory $RUN"
  FIGURES+=("$(grep -Eo 'epoch 1: loss [0-9.]+' "$LOGS/ddp.log" | tail -1)")
else
  NAMES+=("torchrun 2 GPUs"); STATUS+=("skipped"); ELAPSED+=(0); FIGURES+=("$GPUS GPU(s)")
fi

TOTAL=$(( $(date +%s) - START ))
echo
echo "gpu_check $(date -u +%Y-%m-%dT%H:%MZ), $GPU_NAME, $GPUS GPU(s), $(nproc) CPUs, torch $($PY -c 'import torch; print(torch.__version__)'), $(git rev-parse --short HEAD 2>/dev/null), ${TOTAL}s"
printf '| %-16s | %-12s | %5s | %s |\n' step status s figures
printf '|%s|%s|%s|%s|\n' ------------------ -------------- ------- --------
for i in "${!NAMES[@]}"; do
  printf '| %-16s | %-12s | %5s | %s |\n' "${NAMES[$i]}" "${STATUS[$i]}" "${ELAPSED[$i]}" "${FIGURES[$i]}"
done
for s in "${STATUS[@]}"; do [[ $s == ok || $s == skipped ]] || exit 1; done
