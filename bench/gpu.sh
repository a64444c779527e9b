#!/usr/bin/env bash
# Every GPU measurement of issue 6 in one run, for a machine with one CUDA GPU and a Python
# that has CUDA torch and this project's requirements (README: "GPU"). Prints the tables for
# BENCHMARKS.md; about 11 minutes on an H100 without the scaling part (added since, not yet run;
# up to 8 more minutes). Each part has its own time limit, so one that
# hangs does not cost the others.
#   bash bench/gpu.sh 2>&1 | tee gpu-bench.txt
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
part() { echo; echo "## $*"; }
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), torch.__version__)' || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

part "the CUDA-graph step gives eager's numbers (tests/test_cuda.py)"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
part "training step: eager vs the whole step as one CUDA graph, fp32 and bf16, every network"
timeout 150 "$PY" bench/bench_train.py --device cuda --repeats 20
part "several trials on one GPU: the seeds of a grid cell as one vmapped ensemble"
timeout 120 "$PY" bench/bench_packing.py --mode ensemble --seconds 10
part "several trials on one GPU: the ensemble, each step one CUDA graph"
timeout 120 "$PY" bench/bench_packing.py --mode ensemble --graph --seconds 10
part "several trials on one GPU: Ray tasks of 1/N GPU each, each replaying its CUDA graph"
timeout 240 "$PY" bench/bench_packing.py --mode ray --graph --seconds 10
part "the same with CUDA MPS, so that the trials' kernels can run side by side"
if nvidia-cuda-mps-control -d; then
    timeout 240 "$PY" bench/bench_packing.py --mode ray --graph --seconds 10
    echo quit | nvidia-cuda-mps-control
fi
part "scaling with K, T and batch size, the graphed step, bf16 and fp32"
timeout 240 "$PY" bench/bench_scaling.py --device cuda --precision bf16 --plot "${OUT:-results}/scaling_gpu_bf16.png"
timeout 240 "$PY" bench/bench_scaling.py --device cuda --precision fp32 --plot "${OUT:-results}/scaling_gpu_fp32.png"
part "torch.compile of the cell, and its CUDA graphs (reduce-overhead), flying shapes"
timeout 240 "$PY" bench/bench_train.py --device cuda --repeats 20 --only "flying shapes" \
    --paths eager:fp32 graph:fp32 compile:fp32 reduce-overhead:fp32
