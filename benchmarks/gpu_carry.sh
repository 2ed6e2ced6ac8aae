#!/usr/bin/env bash
# Bring onnxruntime-gpu and the export's pure-Python packages to a GPU machine that has no network and takes files
# in transfers of at most 64 MiB: packed here into xz parts, transferred one part at a time, joined there.
#
#   benchmarks/gpu_carry.sh pack          here: download the wheels for the GPU machine's Python, unpack them, xz
#                                         the tree and split it into .gpu-carry/part-NN (58 MiB each)
#   benchmarks/gpu_carry.sh receive       there, once per part (the part transferred into .gpu-carry/):
#                                         keeps it in $SEESR_CARRY_DIR, outside the tree, while the machine is up
#   benchmarks/gpu_carry.sh assemble      there, after the last part: joins and unpacks the parts into
#                                         $SEESR_CARRY_DIR/site, checks the imports, prints the PYTHONPATH to use
#
# Each transfer holds the working tree and one part (.gpu-carry/part-NN), followed by
# `benchmarks/gpu_carry.sh receive` there; after the last part, `assemble && ... gpu.sh`
# (results/nvidia-h200/README.md lists the steps).
#
# What is packed (override with SEESR_CARRY_PACKAGES, SEESR_CARRY_PYTHON): the machine has torch, onnx,
# transformers and numpy, but no onnxruntime-gpu, diffusers or onnx-graphsurgeon (measured on the H200, Python 3.12).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
PACKAGES=${SEESR_CARRY_PACKAGES:-"onnxruntime-gpu==1.31.1 diffusers==0.42.1 onnx-graphsurgeon==0.6.1 onnxscript==0.7.2 onnx-ir==1.1.0"}
TARGET_PYTHON=${SEESR_CARRY_PYTHON:-3.12}
PART_SIZE=58M  # with the working tree (~2 MB), under the 64 MiB a transfer takes
CARRY=$ROOT/.gpu-carry
THERE=${SEESR_CARRY_DIR:-/tmp/seesr-carry}

pack() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/seesr-carry.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$work/wheels" $PACKAGES
    mkdir -p "$work/site"
    for wheel in "$work"/wheels/*.whl; do
        "$PY" -m zipfile -e "$wheel" "$work/site"
    done
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    tar -C "$work/site" -cf - . | xz -T0 -6 | split -b "$PART_SIZE" -d - "$CARRY/part-"
    ls "$work/wheels" > "$CARRY/wheels.txt"
    echo "packed $(wc -l < "$CARRY/wheels.txt") wheels into $(find "$CARRY" -name 'part-*' | wc -l) parts:"
    ls -l "$CARRY"
}

receive() {
    compgen -G "$CARRY/part-*" >/dev/null \
        || { echo "gpu_carry.sh: no .gpu-carry/part-* came with this call (carry one)" >&2; exit 2; }
    mkdir -p "$THERE/parts"
    cp "$CARRY"/part-* "$THERE/parts/"
    echo "have $(find "$THERE/parts" -name 'part-*' | wc -l) parts in $THERE/parts"
}

assemble() {
    compgen -G "$THERE/parts/part-*" >/dev/null \
        || { echo "gpu_carry.sh: no parts received in $THERE/parts (run receive first)" >&2; exit 2; }
    rm -rf "$THERE/site" && mkdir -p "$THERE/site"
    cat "$THERE"/parts/part-* | xz -d | tar -C "$THERE/site" -xf -
    PYTHONPATH="$THERE/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import importlib
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels torch brought
print("onnxruntime", ort.__version__, ort.get_available_providers())
for name in ("diffusers", "onnx_graphsurgeon", "onnx", "torch", "transformers", "safetensors", "tokenizers", "PIL"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", type(exc).__name__, exc)
EOF
    echo "export PYTHONPATH=$THERE/site\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
    pack) pack ;;
    receive) receive ;;
    assemble) assemble ;;
    *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
