"""Export every network at full SD2-base / Swin-L size and record time, size, memory and parity.

Not part of CI (it writes ~10 GB of random-weight checkpoints and takes minutes).
Each network is exported in its own process (growing --networks list, earlier
graphs reused from the cache) so its peak memory can be read on its own.

    python benchmarks/export_sd2.py --work /tmp/seesr-sd2 [--precision fp32|fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import NETWORK_NAMES


def run_child(args: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RSS in bytes, exit code) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'runtime'}"))
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss * 1024, process.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/seesr-sd2"))
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    args = parser.parse_args()

    checkout, bundle = args.work / "checkout", args.work / f"engines-{args.precision}" / "sd2"
    py = [sys.executable, "-m", "seesr_export.cli"]
    fixture = {}
    if not (checkout / ".complete").exists():
        seconds, peak, code = run_child(
            [*py, "fixture", "--size", "sd2", "--weights", "safetensors", "--out", str(checkout)]
        )
        if code:
            return code
        (checkout / ".complete").write_text("sd2 seed 0\n")
        fixture = {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2)}

    shutil.rmtree(bundle, ignore_errors=True)  # every network exported for real, not from the cache
    rows = []
    for i, name in enumerate(NETWORK_NAMES):
        seconds, peak, code = run_child(
            [
                *py,
                "build",
                "--seesr-root",
                str(checkout),
                "--out",
                str(bundle),
                "--precision",
                args.precision,
                "--networks",
                *NETWORK_NAMES[: i + 1],
            ]
        )
        if code:
            print(f"build of {name} failed (exit {code})", file=sys.stderr)
            return code
        entry = Manifest.load(bundle).data["networks"][name]
        sizes = {p: sum((bundle / rel).stat().st_size for rel in f["sha256"]) for p, f in entry["files"].items()}
        rows.append(
            {
                "network": name,
                "seconds": round(seconds, 1),
                "peak_rss_gb": round(peak / 1e9, 2),
                "size_mb": {p: round(s / 1e6, 1) for p, s in sizes.items()},
                "external_data": {p: f["external_data"] is not None for p, f in entry["files"].items()},
                "parity_rel_l2": {p: v["max_rel_l2"] for p, v in entry["parity"].items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    manifest = Manifest.load(bundle).data
    result = {
        "benchmark": "export_sd2",
        "precision": args.precision,
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "versions": manifest["provenance"]["versions"],
        "fixture": fixture,
        "networks": rows,
        "note": "seconds and peak RSS per child process include loading that network's checkpoint; "
        "parity is onnxruntime CPU vs torch at full width, batch 1, 8x16 latent",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"export_sd2_{args.precision}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Export at full SD2 size ({args.precision}), {result['cpu']}, {result['cores']} cores",
        "",
        "| network | seconds | peak RSS (GB) | size (MB) | external data | rel L2 vs torch |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['seconds']} | {r['peak_rss_gb']} | "
            f"{', '.join(f'{p} {s}' for p, s in r['size_mb'].items())} | "
            f"{', '.join(p for p, e in r['external_data'].items() if e) or 'no'} | "
            f"{', '.join(f'{p} {v:.1e}' for p, v in r['parity_rel_l2'].items())} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
