"""End-to-end quality of the runtime's CPU configurations against fp32: PSNR of the final image and relative
L2 of the final latent, same image, same noise (the rule behind ``seesr upscale``'s CPU default: the
fastest configuration at >= 35 dB). One process per configuration, one after another.

    python benchmarks/openvino_quality.py --bundle /work/engines/sd2-fp32 --size 512 --steps 2 \\
        --configs openvino:fp32 openvino:bf16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_runtime import SeeSRPipeline
from seesr_runtime.bench import synthetic_lr


def worker(bundle: str, config: str, size: int, steps: int, threads: int | None, out: str) -> None:
    backend, precision = config.split(":")
    options = {"precision": precision, "threads": threads}
    started = time.perf_counter()
    pipe = SeeSRPipeline.from_bundle(bundle, backend=backend, **options)
    result = pipe(synthetic_lr(size), seed=0, steps=steps)
    np.savez(
        out,
        image=np.asarray(result.image),
        latent=result.latents[-1],
        seconds=time.perf_counter() - started,
        inference_precision=str(getattr(pipe.backend, "inference_precision", precision)),
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        bundle, config, size, steps, threads, out = sys.argv[2:8]
        worker(bundle, config, int(size), int(steps), int(threads) or None, out)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--reference", default="onnxruntime:fp32", help="BACKEND:PRECISION everything is compared with")
    parser.add_argument("--configs", nargs="+", default=["openvino:fp32", "openvino:bf16"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    parser.add_argument("--name", default="openvino_quality")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'runtime'}"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="seesr-ovq-") as tmp:
        for config in [args.reference, *args.configs]:
            out = Path(tmp) / f"{config.replace(':', '_')}.npz"
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(args.bundle),
                    config,
                    str(args.size),
                    str(args.steps),
                    str(args.threads),
                    str(out),
                ],
                check=True,
                env=env,
            )
            results[config] = dict(np.load(out))
            print(config, f"{float(results[config]['seconds']):.1f} s", flush=True)
    reference = results[args.reference]
    rows = [
        {
            "config": c,
            "inference_precision": str(r["inference_precision"]),
            "psnr_db": psnr(r["image"], reference["image"]),
            "latent_rel_l2": float(
                np.linalg.norm(r["latent"] - reference["latent"]) / np.linalg.norm(reference["latent"])
            ),
            "load_and_run_s": round(float(r["seconds"]), 1),
        }
        for c, r in results.items()
        if c != args.reference
    ]
    report = {
        "benchmark": "openvino_quality",
        "reference": args.reference,
        "size": args.size,
        "steps": args.steps,
        "threads": args.threads or None,
        "rows": rows,
        "load_average": os.getloadavg(),
        "command": "python benchmarks/openvino_quality.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"# End-to-end quality against {args.reference}, {args.size} px, {args.steps} steps, same noise",
        "",
        "| configuration | computes in | final image PSNR (dB) | final latent rel L2 |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['config']} | {r['inference_precision']} | {r['psnr_db']:.1f} | {r['latent_rel_l2']:.2e} |" for r in rows
    ]
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
