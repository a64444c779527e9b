#!/usr/bin/env bash
# Every GPU measurement of issue 6 in one run, for a machine with one CUDA GPU and a CUDA
# build of torch in .venv (README: "GPU"). Prints the tables for BENCHMARKS.md; about 15
# minutes, most of it torch.compile.
#   bash bench/gpu.sh 2>&1 | tee gpu-bench.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
"$PY" bench/bench_train.py --device cuda --compile --repeats 5        # eager / compile / CUDA graphs / bf16
"$PY" bench/bench_packing.py --mode ray --seconds 30                  # 1, 2, 4, 8 Ray trials on the GPU
"$PY" bench/bench_packing.py --mode ensemble --seconds 30             # 1, 2, 4, 8 members in one vmap
