#!/usr/bin/env bash
# The GPU check in one call on a machine with one CUDA GPU: the GPU tests, the cuDNN bound, the benchmark on the
# GPU in fp32 / fp16 / bf16, and configs/imdb_lstm.yaml and configs/imdb_best.yaml trained to the end in fp16.
#   benchmarks/gpu_check.sh OUT_DIR [IMDB_DIR]
# IMDB_DIR: train.parquet and test.parquet (default: $DISTSENT_DATA_PATH). Writes OUT_DIR/gpu_check.log (all that
# was printed) and OUT_DIR/gpu_check.json (the numbers); exits non-zero if a step failed. Extra arguments go to
# benchmarks/gpu_check.py (e.g. --device cpu --quick, to try the script without a GPU). $PYTHON, if set, is the
# interpreter to run it with (default: python3 on the PATH, an activated virtual environment's).
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [IMDB_DIR] [gpu_check.py options]}
data=${2:-${DISTSENT_DATA_PATH:?give IMDB_DIR or set DISTSENT_DATA_PATH}}
shift $(( $# >= 2 ? 2 : 1 ))
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
"${PYTHON:-python3}" "$here/gpu_check.py" --out "$out" --data "$data" "$@" 2>&1 | tee "$out/gpu_check.log"
