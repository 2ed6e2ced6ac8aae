"""Time and peak memory of the VAE decoder at large outputs: the official tiled VAE against untiled.

    python benchmarks/tiled_vae.py --bundle engines/sd2 --sizes 1024 2048 4096 --out benchmarks/results/cpu

Each (size, mode) runs in its own process (peak RSS is per process): the bundle's sessions are opened,
one decode warms nothing up (each size is decoded once: a 4096 px decode takes minutes on a small CPU),
then a random latent of size/8 is decoded and the process's peak RSS is read. Modes:
``tiled`` is the runtime's default (the official rule: tiles of --tile latent px above tile + 22),
``untiled`` decodes in one piece (``--no-tiled-vae``), ``spilled`` is tiled with the tiles' waiting
states kept in files (``tiled_vae_spill_dir``). Writes tiled_vae.{json,md} into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from seesr_runtime import SeeSRPipeline
from seesr_runtime.tiled_vae import TiledVaeLayout, split_tiles

MODES = ("tiled", "untiled", "spilled")


def child(bundle: str, size: int, mode: str, tile: int, threads: int | None) -> dict:
    options = {"threads": threads} if threads else {}
    spill = tempfile.mkdtemp(prefix="seesr-spill-") if mode == "spilled" else None
    pipe = SeeSRPipeline.from_bundle(bundle, tiled_vae_spill_dir=spill, **options)
    latent = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    pipe.decode(np.zeros((1, 4, 8, 8), np.float32), tile)  # opens the untiled session
    base_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    start = time.perf_counter()
    image = pipe.decode(latent, tile, tiled=mode != "untiled")
    seconds = time.perf_counter() - start
    assert image.size == (size, size)
    tiles = None
    if mode != "untiled" and size // 8 > tile + 22:
        tiles = len(split_tiles(size // 8, size // 8, tile, TiledVaeLayout.for_half("decoder"))[0])
    return {
        "size": size,
        "mode": mode,
        "tile": tile,
        "tiles": tiles,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "rss_before_decode_gb": round(base_gb, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--tile", type=int, default=224, help="decoder tile in latent px (official default 224)")
    parser.add_argument(
        "--max-untiled",
        type=int,
        default=2048,
        help="largest output decoded untiled (its attention alone needs (size/8)^4 * 4 bytes)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--append", action="store_true", help="add rows to an existing --out/tiled_vae.json")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "MODE", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, mode, tile = int(args.child[0]), args.child[1], int(args.child[2])
        print(json.dumps(child(args.bundle, size, mode, tile, args.threads)))
        return 0
    previous = args.out / "tiled_vae.json"
    rows = json.loads(previous.read_text())["rows"] if args.append and previous.exists() else []
    for size in args.sizes:
        for mode in args.modes:
            if mode == "untiled" and size > args.max_untiled:
                continue
            if mode == "spilled" and size // 8 <= args.tile + 22:
                continue  # below the threshold spilling changes nothing
            cmd = [sys.executable, __file__, "--bundle", args.bundle, "--child", str(size), mode, str(args.tile)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"[tiled_vae] {size} px, {mode} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                rows.append({"size": size, "mode": mode, "tile": args.tile, "error": tail[0]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[tiled_vae]   {rows[-1]}", file=sys.stderr, flush=True)
            write(args.out, args, rows)
    return 0


def write(out: Path, args, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "tiled_vae",
        "bundle": str(args.bundle),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    (out / "tiled_vae.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "| output | mode | tile (latent px) | tiles | decode | peak RSS | RSS before the decode |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} px | {r['mode']} | | | failed: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['size']} px | {r['mode']} | {r['tile']} | {r['tiles'] or 'untiled'} | {r['seconds']} s | "
                f"{r['peak_rss_gb']} GB | {r['rss_before_decode_gb']} GB |"
            )
    (out / "tiled_vae.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
