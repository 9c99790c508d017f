#!/usr/bin/env bash
# The GPU check of issues 4 and 7, in one call on a machine with one CUDA GPU and no network:
#   1. the CUDA tests (tests/model/test_cuda.py: CUDA = CPU in float32, bf16 close, decoding, transformers parity)
#   2. the training-step benchmark (benchmarks/gpu_bench.py: ours vs transformers 4.57.6 vs GPT+SDPA, long sequences)
#   3. the quickstart on the GPU: DeepSpeed bf16 pretraining with NCCL, conversion, the six heads
#   4. exact resume on the GPU path (benchmarks/resume_check.py)
#   (profile: the top CUDA kernels of one step at 4x4096 chunk 1024)
#   5. cached decoding latency at 1k / 8k / 64k context (benchmarks/decode_bench.py): dynamic cache, static cache,
#      static cache replayed as a CUDA graph
#   (ema: the EMA alone, chunked recurrence against the FFT it replaced, forward + backward, benchmarks/ema_bench.py;
#   run after the tests)
#   (estimate: benchmarks/gpu_cost_model.py's CPU-side estimates of the same steps, run in the background while the
#   tests run and waited for before the bench, to check its constants against the bench's measurements:
#   estimate.log; informational, its failure does not fail the check)
# Packages the machine lacks travel as wheels in .whl/ (gitignored; fetch them with `bash benchmarks/gpu_check.sh
# --fetch-wheels` on a machine with PyPI): transformers 4.57.6 and its pins, DeepSpeed and its pydantic.
# Logs and JSON go to $OUT (the device tool's folder) or benchmarks/results/gpu. Each part has its own time limit,
# and a failing part does not stop the others; the exit status says whether all passed.
#
#   bash benchmarks/gpu_check.sh                 # everything (~7 min on an H200)
#   PARTS="tests bench" bash benchmarks/gpu_check.sh
# The parts' limits add up to ~16.5 min, past the device tool's 10 min per command: when parts may hit their
# limits, run it as two commands, PARTS="estimate tests ema bench" (<= 8 min) then
# PARTS="profile quickstart resume decode" (<= 8.5 min).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 hjson==3.1.0 pydantic==2.14.4 \
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    # DeepSpeed publishes only an sdist; its wheel is pure Python (no ops are built: the trainer uses torch's AdamW)
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
    exit
fi

OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$ROOT
else
    export PYTHONPATH=$ROOT
fi
PARTS=${PARTS:-"estimate tests ema bench profile quickstart resume decode"}
status=0
started=$SECONDS

part() {  # part NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit}s, at $((SECONDS - started))s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - started))s"
    [ "$rc" = 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("transformers", "deepspeed", "sentencepiece", "safetensors"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "missing:", err)
EOF

estimates() {  # CPU only: fake tensors at the GPU shapes, no GPU time
    python3 benchmarks/gpu_cost_model.py --top 10 && python3 benchmarks/gpu_cost_model.py --impl gpt --top 0 &&
        python3 benchmarks/gpu_cost_model.py --memory --batch 1 --seq 16384 &&
        python3 benchmarks/gpu_cost_model.py --memory --batch 4 --seq 4096
}

for p in $PARTS; do
    case $p in
    estimate) export -f estimates; part estimate 150 bash -c estimates > /dev/null 2>&1 & ;;
    tests) part tests 150 python3 -m pytest -q -p no:cacheprovider tests/model/test_cuda.py ;;
    bench) wait  # the background estimates, so that they do not share the host with a timed eager step
           part bench 270 python3 benchmarks/gpu_bench.py --budget-s 250 --json "$OUT/gpu_bench.json" ${BENCH_ARGS:-} ;;
    profile) part profile 90 python3 benchmarks/gpu_bench.py --worker --impl ours --batch 4 --seq 4096 --chunk 1024 \
                 --steps 2 --warmup 1 --profile ;;
    quickstart) part quickstart 180 python3 -m launch.quickstart --nproc 1 --steps 100 --run-dir /tmp/qs --fresh \
                    precision.dtype=bf16 ;;
    resume) part resume 120 python3 benchmarks/resume_check.py --data /tmp/qs/dataset --tokenizer /tmp/qs/tokenizer \
                --work /tmp/resume --steps 20 precision.dtype=bf16 ;;
    decode) part decode 120 python3 benchmarks/decode_bench.py --device cuda --dtype bf16 --hidden 1024 --layers 16 \
                --nffn 2048 --bias rotary --contexts 1024 8192 65536 --steps 32 ;;
    ema) part ema 60 bash -c "python3 benchmarks/ema_bench.py --device cuda --hidden 1024 --shapes 4x4096 1x16384 \
             1x262144 && python3 benchmarks/ema_bench.py --device cuda --hidden 1024 --shapes 4x4096 --bidirectional" ;;
    *) echo "unknown part $p"; status=1 ;;
    esac
done
wait  # the background estimates
[ -f "$OUT/estimate.log" ] && { echo; echo "=== estimates (benchmarks/gpu_cost_model.py)"; cat "$OUT/estimate.log"; }
echo; echo "gpu_check: $([ $status = 0 ] && echo all parts passed || echo some part failed) in $((SECONDS - started))s"
exit $status
