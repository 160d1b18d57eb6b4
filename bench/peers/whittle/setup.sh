#!/usr/bin/env bash
# Makes whittle's own virtual environment, bench/peers/whittle/.venv, from requirements.txt.
# torchvision comes in with whittle's dependencies but its wheel needs a CUDA torch and fails to
# import beside the CPU one; whittle's GPT does not use it, so it is removed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q -r "$here/requirements.txt"
"$here/.venv/bin/pip" uninstall -y -q torchvision || true
"$here/.venv/bin/python" -c 'import whittle, torch; print("whittle ready; torch", torch.__version__)'
