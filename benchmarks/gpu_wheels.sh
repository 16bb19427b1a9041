#!/bin/sh
# Wheels that benchmarks/bench_gpu_sd35.py needs on a GPU machine whose image has torch, transformers,
# peft, accelerate, huggingface-hub and safetensors but not diffusers (this workplace's 'cuda' image):
# diffusers and its one missing requirement, pure-Python wheels, into .whl/ (ignored by git).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
ls -l .whl
