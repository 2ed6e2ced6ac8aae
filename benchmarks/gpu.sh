#!/usr/bin/env bash
# GPU latency benchmark, one script, no network: full-size random-weight checkpoints -> fp16 bundle ->
# the PyTorch reference in fp16 (SDPA) and every runtime backend available here, side by side.
#
#   benchmarks/gpu.sh [OUT_DIR]             on a GPU machine (sized for < 8 min on an H100/H200)
#   benchmarks/gpu.sh --dry-run [OUT_DIR]   on any CPU: the same steps on the tiny fixture, in ~3 min
#
# Steps: fixture -> fp16 bundle (with the fused GPU graphs) -> accuracy of every fp16 graph and end-to-end
# PSNR against fp32 (gpu_validate.py --onnxruntime) -> GPU memory with 1, 2, 3 static shapes captured
# (ort_shapes_memory.py) -> one merged ControlNet+UNet call per step against two (merged_denoiser.py) ->
# latency: PyTorch, then onnxruntime from today's plain fp16 graphs with host feeds up to GPU graphs +
# IOBinding + static shapes + CUDA graphs, each with its per-step breakdown.
#
# Needs the export extras' packages (torch, diffusers, transformers, onnx, onnx-graphsurgeon) and, for the
# runtime on the GPU, onnxruntime-gpu (TensorRT is benchmarked too where `import tensorrt` works).
# Writes OUT_DIR/bench_gpu.{json,md,png}, gpu_validate_onnxruntime.json, ort_shapes_memory.json,
# merged_denoiser.json, environment.txt and gpu.log (default benchmarks/results/<gpu>).
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
    # The GPU configurations' code paths (IOBinding, static-shape sessions) on the CPU provider; the GPU
    # graphs themselves need CUDA. Small shapes for the checks: the dry run checks the script, not figures.
    runtime_configs=("onnxruntime:fp16:cpu::iobinding,static")
    name=dry_run dry=--dry-run psnr_steps=1 psnr_size=128 memory_sides="16 24 20" check_latent=16 merged_sides=16
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
    size=sd2 torch_config=${SEESR_GPU_TORCH:-cuda:fp16} sizes="512 1024" steps="50 5" runs=${SEESR_GPU_RUNS:-2} warmup=1
    jobs=6 runtime_configs=() dry="" psnr_steps=${SEESR_GPU_PSNR_STEPS:-20} ort_cuda=0
    psnr_size=512 memory_sides="64 96 80" check_latent="" merged_sides="64 96"
    if "$PY" -c "import onnxruntime as o, sys; o.preload_dlls() if hasattr(o, 'preload_dlls') else None; \
sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        # Today's baseline (plain fp16 graphs, host feeds), then one change at a time.
        ort_cuda=1
        runtime_configs+=("onnxruntime:fp16:cuda::plain,no-iobinding" "onnxruntime:fp16:cuda::no-iobinding"
                          "onnxruntime:fp16:cuda::iobinding" "onnxruntime:fp16:cuda::iobinding,static"
                          "onnxruntime:fp16:cuda::cudagraph")
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

# To split the run over two device calls (same SEESR_GPU_WORK: the bundle is reused): SEESR_GPU_CHECKS=0 skips
# the accuracy and memory checks, SEESR_GPU_CONFIGS="onnxruntime:fp16:cuda::cudagraph ..." picks configurations,
# SEESR_GPU_TORCH=none skips PyTorch.
if [[ -n "${SEESR_GPU_CONFIGS:-}" ]]; then read -r -a runtime_configs <<< "$SEESR_GPU_CONFIGS"; fi
if [[ "${SEESR_GPU_CHECKS:-1}" == 0 ]] || (( ! DRY && ! ort_cuda )); then
    log "accuracy and shape-memory checks skipped (SEESR_GPU_CHECKS=0, or no onnxruntime CUDA provider)"
else
    log "accuracy of the fp16 graphs against fp32 (per network, end-to-end PSNR over $psnr_steps steps)"
    "$PY" "$ROOT/benchmarks/gpu_validate.py" --onnxruntime --bundle "$bundle" --out "$OUT" \
        --psnr-steps "$psnr_steps" --psnr-size "$psnr_size" ${check_latent:+--latent "$check_latent"} $dry \
        || validate_status=$?
    log "memory with 1, 2, 3 static shapes captured"
    # shellcheck disable=SC2086
    "$PY" "$ROOT/benchmarks/ort_shapes_memory.py" --bundle "$bundle" --sides $memory_sides ${dry:+--calls 1} \
        --json "$OUT/ort_shapes_memory${dry:+_dry_run}.json" $dry || memory_status=$?
    log "merged denoiser (ControlNet + UNet as one graph) against two calls per step"
    # shellcheck disable=SC2086
    "$PY" "$ROOT/benchmarks/merged_denoiser.py" --bundle "$bundle" --sides $merged_sides --work "$WORK" \
        ${dry:+--steps 2 --warmup 1} --json "$OUT/merged_denoiser${dry:+_dry_run}.json" $dry || merged_status=$?
fi

# shellcheck disable=SC2086
(( ${#runtime_configs[@]} )) || { log "no runtime configuration to benchmark"; exit "${validate_status:-${memory_status:-${merged_status:-0}}}"; }
"$PY" "$ROOT/benchmarks/bench.py" --bundle "$bundle" --seesr-root "$checkout" --torch "$torch_config" \
    --runtime "${runtime_configs[@]}" --sizes $sizes --steps $steps --runs "$runs" --warmup "$warmup" \
    ${peak:+--peak-tflops "$peak"} --name "$name" --out "$OUT" --timeout 900 > "$OUT/bench_$name.stdout" || status=$?
status=${status:-${validate_status:-${memory_status:-${merged_status:-0}}}}
log "done: results in $OUT (exit $status; accuracy check ${validate_status:-0}, shape memory ${memory_status:-0}, merged ${merged_status:-0})"
exit "$status"
