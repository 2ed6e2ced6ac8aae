"""What sha256 verification costs on load: first load (no stamp) vs stamped load, and the external-data scan.

    nice -n 19 python benchmarks/verify_cost.py /work/engines/sd2-vae

The stamp is written to a temporary directory, never into the bundle, so a shared or read-only bundle
is left as it is. The first figure includes reading the files (cold or warm page cache, as it happens);
``verify=always`` right after it shows the hashing alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from seesr_runtime.manifest import Manifest
from seesr_runtime.verification import verify_bundle


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    args = parser.parse_args()
    manifest, load_s = timed(lambda: Manifest.load(args.bundle, verify="never"))
    pinned = manifest.all_files()
    megabytes = sum(manifest.file(rel).stat().st_size for rel in pinned) / 1e6
    with tempfile.TemporaryDirectory(prefix="seesr-verify-cost-") as scratch:
        stamps = [Path(scratch) / "stamp.json"]
        first, first_s = timed(lambda: verify_bundle(manifest, "auto", stamps))
        stamped, stamped_s = timed(lambda: verify_bundle(manifest, "auto", stamps))
        always, always_s = timed(lambda: verify_bundle(manifest, "always", stamps))
    networks = list(manifest.data["networks"])
    _, scan_s = timed(lambda: [manifest.graph_path(n, "fp32") for n in networks])
    print(f"{args.bundle}: {len(pinned)} files, {megabytes:.0f} MB; manifest and path checks {load_s * 1e3:.0f} ms")
    print(f"first load:       hashed {len(first.hashed):3d} files in {first_s:7.2f} s ({megabytes / first_s:.0f} MB/s)")
    print(
        f"stamped load:     hashed {len(stamped.hashed):3d} files in {stamped_s * 1e3:7.1f} ms "
        f"({len(stamped.trusted)} vouched for by the stamp)"
    )
    print(
        f"verify='always':  hashed {len(always.hashed):3d} files in {always_s:7.2f} s ({megabytes / always_s:.0f} MB/s)"
    )
    print(f"external-data scan of the {len(networks)} fp32 network graphs: {scan_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
