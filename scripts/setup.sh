#!/usr/bin/env bash
# Installs gradwatch, the frameworks its integration tests drive (Lightning under both package
# names, transformers, Accelerate, W&B, MLflow) and the development tools.
#
# torch is installed first when none is present, because pip would otherwise resolve it through
# the dependencies above. Which build `torch==2.13.0` gives depends on where pip finds it: on the
# project's machines it is a CPU wheel that lies on local disk; from the public PyPI index on Linux
# it is the CUDA build (several GB, with the NVIDIA libraries). To choose, set TORCH_INDEX_URL to
# the PyTorch wheel index of the build you want, e.g. https://download.pytorch.org/whl/cpu for the
# CPU build; an existing torch (any version gradwatch supports, >= 2.4) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
"$PYTHON" -c "import torch; print('gradwatch setup: torch', torch.__version__)"
