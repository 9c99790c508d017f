#!/usr/bin/env bash
# The main job: set up the environment, then run the pipeline on this machine.
# (Until data preparation, training and conversion land, the pipeline is the model demo: build a MEGA from
# configs/model/tiny.yaml, save it in Hugging Face format and load it into all six heads.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/megatron-mega demo --config configs/model/tiny.yaml --output-dir runs/quickstart "$@"
