#!/usr/bin/env bash
# GPU latency benchmark, one script, no network: full-size random-weight checkpoints -> fp16 bundle ->
# the PyTorch reference in fp16 (SDPA) and every runtime backend available here, side by side.
#
#   benchmarks/gpu.sh [OUT_DIR]             on a GPU machine (sized for < 8 min on an H100/H200)
#   benchmarks/gpu.sh --dry-run [OUT_DIR]   on any CPU: the same steps on the tiny fixture, in ~2 min
#
# Needs the export extras' packages (torch, diffusers, transformers, onnx, onnx-graphsurgeon) and, for the
# runtime on the GPU, onnxruntime-gpu (TensorRT is benchmarked too where `import tensorrt` works).
# Writes OUT_DIR/bench_gpu.{json,md,png}, environment.txt and gpu.log (default benchmarks/results/<gpu>).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT=${1:-}
WORK=${SEESR_GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/seesr-gpu.XXXXXX")}
export PYTHONPATH="$ROOT:$ROOT/runtime${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
started=$SECONDS
log() { echo "[gpu.sh +$((SECONDS - started))s] $*" >&2; }

if (( DRY )); then
    # The GPU run's steps at CPU cost: the fp16 graphs (on the CPU provider) and both sizes, one step each.
    size=tiny torch_config=cpu:fp32 sizes="512 1024" steps="1 1" runs=1 warmup=0 jobs=2 peak=""
    runtime_configs=("onnxruntime:fp16:cpu")
    name=dry_run
else
    command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi: not a GPU machine (try --dry-run)" >&2; exit 2; }
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    # Dense fp16 tensor-core peaks from the datasheets, for the "fraction of peak" column.
    case "$gpu" in
        *H100*|*H200*) peak=989 ;;
        *A100*) peak=312 ;;
        *L40S*) peak=362 ;;
        *) peak="" ;;
    esac
    size=sd2 torch_config=cuda:fp16 sizes="512 1024" steps="50 10" runs=3 warmup=1 jobs=6
    runtime_configs=()
    if "$PY" -c "import onnxruntime as o, sys; o.preload_dlls() if hasattr(o, 'preload_dlls') else None; \
sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        runtime_configs+=("onnxruntime:fp16:cuda")
    else
        log "onnxruntime has no CUDA provider here (install onnxruntime-gpu): runtime on onnxruntime skipped"
    fi
    name=gpu
fi
OUT=${OUT:-$ROOT/benchmarks/results/$("$PY" -c "import sys; sys.path[:0]=['$ROOT/runtime', '$ROOT/benchmarks']; \
from seesr_runtime.bench import machine_info; from bench import machine_kind; print(machine_kind(machine_info()))")}
mkdir -p "$OUT"
exec 2> >(tee -a "$OUT/gpu.log" >&2)

{
    echo "date: $(date -u +%FT%TZ)"; echo "commit: ${SEESR_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "onnxruntime", "onnx", "diffusers", "transformers", "numpy", "tensorrt"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:  # noqa: BLE001
        print(name, "missing:", type(exc).__name__)
EOF
} > "$OUT/environment.txt" 2>&1

checkout=$WORK/checkout-$size
if [[ ! -f $checkout/.complete ]]; then
    log "writing $size random-weight checkpoints to $checkout"
    "$PY" -m seesr_export.cli fixture --size "$size" --out "$checkout" -q
    touch "$checkout/.complete"
fi

backend=onnx
if (( ! DRY )) && "$PY" -c "import tensorrt" 2>/dev/null; then
    backend=tensorrt
    runtime_configs+=("tensorrt:fp16")
fi
bundle=$WORK/engines/$size
log "building the fp16 bundle $bundle (backend $backend, $jobs export processes)"
"$PY" -m seesr_export.cli build --seesr-root "$checkout" --out "$bundle" --precision fp16 --backend "$backend" \
    --jobs "$jobs" --no-verify -q
log "bundle ready"

# shellcheck disable=SC2086
"$PY" "$ROOT/benchmarks/bench.py" --bundle "$bundle" --seesr-root "$checkout" --torch "$torch_config" \
    --runtime "${runtime_configs[@]}" --sizes $sizes --steps $steps --runs "$runs" --warmup "$warmup" \
    ${peak:+--peak-tflops "$peak"} --name "$name" --out "$OUT" --timeout 900 > "$OUT/bench_$name.stdout" || status=$?
log "done: results in $OUT (exit ${status:-0})"
exit "${status:-0}"
