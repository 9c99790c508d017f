#!/usr/bin/env bash
# The main job: set up the environment, then run the whole pipeline on this machine (python -m launch.quickstart):
# embedded corpus -> tokenizer -> tokenized dataset -> DeepSpeed pretraining on 2 local processes -> validation
# perplexity -> Hugging Face conversion -> all six heads -> greedy sample and a summary table.
# Rerunning skips finished phases and resumes training from its checkpoint. Options: --help (e.g. --steps 40,
# --corpus 'my/*.jsonl', --fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do  # help needs no environment (the module imports nothing heavy): no install first
  case "$arg" in -h|--help) exec "${PYTHON:-python3}" -m launch.quickstart --help ;; esac
done
bash launch/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m launch.quickstart "$@"
