#!/usr/bin/env bash
# Set up .venv with SPE and its test tools, using the CPU build of PyTorch.
#
# A plain `pip install torch` on Linux pulls a multi-GB CUDA build; SPE runs on
# the CPU (a GPU is optional), so the CPU build is installed first: from a
# local wheel folder configured for pip when it holds torch 2.13.0 (as on the
# project's machines), else from PyTorch's CPU package index.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if .venv/bin/pip install --quiet --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    # The local CPU wheel is in; this adds its small dependencies from PyPI.
    .venv/bin/pip install --quiet "torch==2.13.0"
  else
    .venv/bin/pip install --quiet "torch==2.13.0" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
.venv/bin/pip install --quiet -e ".[test]"
.venv/bin/python -c "import spe, torch; print('spe', spe.__version__, '| torch', torch.__version__)"
