#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU, in one folder, in under 8 minutes:
#   bash benchmarks/gpu_check.sh [OUT]        (OUT: default gpu-check/)
# 1. nvidia-smi and the versions; 2. the CUDA-only tests (tests/test_cuda.py: the codec, the
# DDP hook and PipeComm on CUDA tensors; the rate model on CUDA); 3. the codec on
# CUDA-resident tensors, staging included (benchmarks/gpu_check.py); 4. the DDP hook under
# NCCL on CUDA buckets (launch/train_ddp.py --backend nccl: ggcomm and plain DDP, 2 ranks
# with 2 GPUs, else 1); 5. PipeComm under NCCL in a DeepSpeed pipeline (2 GPUs only).
# Each part has its own time limit and log; summary.txt lists every part's exit status.
# Without a CUDA device it checks that its parts parse, says so, and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
bash -n benchmarks/gpu_check.sh || exit 1
"$py" -m py_compile benchmarks/gpu_check.py launch/train_ddp.py launch/train_pipe.py || exit 1
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here: the script and its parts parse; GPU checks skipped" \
    | tee "$out/SKIPPED"
  exit 0
fi
: > "$out/summary.txt"
part() {  # part NAME SECONDS COMMAND...: run, log to OUT/NAME.log, record the exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  tail -n 5 "$out/$name.log"
}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import torch, ggcomm; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'ggcomm', ggcomm.__version__, 'gpus', torch.cuda.device_count())" | tee "$out/versions.txt"
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
ranks=$(( ngpu >= 2 ? 2 : 1 ))
run=("$py" -m torch.distributed.run --nproc_per_node="$ranks" --master_port=29511)
part cuda_tests 150 "$py" -m pytest -q -rs tests/test_cuda.py \
  "tests/test_rate.py::test_eg_rate_on_cuda_matches_cpu"
part codec_cuda 90 "$py" benchmarks/gpu_check.py --out "$out"
part ddp_nccl_gg 90 "${run[@]}" launch/train_ddp.py --backend nccl --hook gg --rate 3 \
  --steps 30 --log-every 10 --json "$out/ddp_nccl_gg.json"
part ddp_nccl_fp32 90 "${run[@]}" launch/train_ddp.py --backend nccl --hook none \
  --steps 30 --log-every 10 --json "$out/ddp_nccl_fp32.json"
if [ "$ngpu" -ge 2 ]; then
  DS_BUILD_OPS=0 part pipe_nccl_gg 90 "${run[@]}" launch/train_pipe.py --backend nccl \
    --compress gg --rate 4 --steps 20 --log-every 5 --json "$out/pipe_nccl_gg.json"
else
  echo "pipe_nccl_gg: skipped (one GPU: a 2-stage NCCL pipeline needs two)" \
    | tee -a "$out/summary.txt"
fi
echo "results in $out/ (summary.txt)"
! grep -q "exit [1-9]" "$out/summary.txt"
