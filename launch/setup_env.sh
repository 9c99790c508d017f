#!/usr/bin/env bash
# Create or refresh the project's virtual environments. Idempotent; safe to rerun.
#   .venv      the project, its test tools (torch pinned first, so pip never fetches a CUDA build)
#   .venv-hf   with --reference: torch + transformers 4.57.6, the last release with MEGA, used only by the parity
#              tests (it pins huggingface_hub<1.0 and so cannot share an environment with current `datasets`)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${MEGA_TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="4.57.6"
PYTHON="${PYTHON:-python3}"
want_reference=0
for arg in "$@"; do
  case "$arg" in
    --reference) want_reference=1 ;;
    *) echo "setup_env.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

quiet_pip() {  # pip's output minus the noise of this machine's local indexes; pip's exit status (pipefail)
  # grep finding nothing to print is not a failure; `cmd | grep || true` would also reset PIPESTATUS and hide pip's
  "$@" 2>&1 | { grep -vE "^WARNING: Location .* is ignored" || true; }
}

make_venv() {
  local dir="$1"
  if [ ! -x "$dir/bin/python" ]; then
    echo "setup: creating $dir"
    "$PYTHON" -m venv "$dir"
    quiet_pip "$dir/bin/python" -m pip install -q --upgrade pip
  fi
  if ! "$dir/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup: installing torch==$TORCH_VERSION into $dir"
    quiet_pip "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  fi
}

make_venv .venv
echo "setup: installing megatron-mega (editable) with test dependencies into .venv"
quiet_pip .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" -e ".[test]"

if [ "$want_reference" = 1 ]; then
  make_venv .venv-hf
  if ! .venv-hf/bin/python -c "import transformers, sys; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
    echo "setup: installing transformers==$TRANSFORMERS_VERSION into .venv-hf"
    quiet_pip .venv-hf/bin/python -m pip install -q "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" safetensors
  fi
fi
echo "setup: done"
