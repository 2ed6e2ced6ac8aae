import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesr_runtime import SeeSRPipeline
from seesr_runtime.lazy import lazy_import

# The build side needs torch, which CI's run of the runtime tests in a base install lacks: its modules are
# imported when a fixture first uses them.
bundle = lazy_import("seesr_export.bundle", extra="export")
fixtures = lazy_import("seesr_export.testing.fixtures", extra="export")
reference_pipeline = lazy_import("seesr_export.reference", extra="export")

# Tokenizer parity cases (for parametrize): SeeSR's prompt suffix, odd spacing and non-ASCII, truncation past
# 77 tokens, the negative prompt.
TOKENIZER_TEXTS = [
    pytest.param("", id="empty"),
    pytest.param("a cat, dog, ,clean, high-resolution, 8k", id="prompt-suffix"),
    pytest.param("Hello,   World!  café naïve 日本", id="spacing-unicode"),
    pytest.param(", ".join(f"tag{i}" for i in range(200)), id="truncated"),
    pytest.param("dotted, noise, blur, lowres, smooth", id="negative-prompt"),
]


@pytest.fixture(scope="session")
def tiny_checkout(tmp_path_factory):
    """A complete random-weight SeeSR checkout (tiny sizes), written once per test session."""
    return fixtures.write_fixture(tmp_path_factory.mktemp("seesr"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def reference(tiny_checkout):
    return reference_pipeline.SeeSRReference.from_paths(tiny_checkout)


@pytest.fixture
def lr_image():
    """A small non-square LR image with structure (deterministic)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:40, 0:56]
    base = np.stack([x * 4, y * 5, (x + y) * 2], -1) % 256
    noisy = base + rng.normal(0, 8, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


ROOT = Path(__file__).resolve().parents[1]
# The tiny bundle is most of a session's set-up (about 80 s, mostly onnxruntime's graph fusions) and depends
# only on the fixture (fixed seed, byte-for-byte deterministic) and the code and tools that write both: it is
# kept between sessions under out/test-bundles/, keyed on a hash of that code and the tools' versions, so an
# edit anywhere in seesr_export/ or the runtime rebuilds it. SEESR_TEST_FRESH_BUNDLE=1 always rebuilds.
BUNDLE_CACHE = ROOT / "out" / "test-bundles"
BUNDLE_TOOLS = ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "numpy")


def tiny_bundle_key() -> str:
    digest = hashlib.sha256()
    for package in ("seesr_export", "runtime/seesr_runtime"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    for tool in BUNDLE_TOOLS:
        digest.update(f"{tool}=={metadata.version(tool)}".encode())
    return digest.hexdigest()[:20]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkout, tmp_path_factory):
    """An fp16 bundle (fp32 + fp16 graphs) of the tiny checkout: reused from out/test-bundles/ when the code
    that writes it is unchanged, else built (once per session) and kept there. Tests must not modify it."""
    if os.environ.get("SEESR_TEST_FRESH_BUNDLE") == "1":
        out = tmp_path_factory.mktemp("engines") / "tiny"
        bundle.build_bundle(tiny_checkout, out, bundle.BuildOptions(precision="fp16"))
        return out
    cached = BUNDLE_CACHE / tiny_bundle_key() / "tiny"
    if (cached / "manifest.json").is_file():
        return cached
    with _cache_lock():  # one builder; a concurrent session (pytest-xdist's other worker) waits for it
        if not (cached / "manifest.json").is_file():
            _build_into_cache(tiny_checkout, cached)
    return cached


@contextlib.contextmanager
def _cache_lock():
    BUNDLE_CACHE.mkdir(parents=True, exist_ok=True)
    with open(BUNDLE_CACHE / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build_into_cache(tiny_checkout, cached: Path) -> None:
    with tempfile.TemporaryDirectory(dir=BUNDLE_CACHE, prefix=".building-") as scratch:
        built = Path(scratch) / "tiny"
        # Two export processes: the same graph bytes as one (test_gpu_script_dry_run), in two thirds of the time.
        bundle.build_bundle(tiny_checkout, built, bundle.BuildOptions(precision="fp16", jobs=2))
        for stale in BUNDLE_CACHE.iterdir():  # other keys: bundles of older code
            if stale.is_dir() and not stale.name.startswith("."):
                shutil.rmtree(stale, ignore_errors=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        built.rename(cached)  # whole or not at all


@pytest.fixture(scope="session")
def int8_tiny_bundle(tiny_checkout, tmp_path_factory):
    """``int8_tiny_bundle(method)``: the tiny checkout's int8 bundle by quantizer ("modelopt", "onnxruntime"),
    3 calibration images at 2 steps, built once per session (a minute or two each) for the int8 and OpenVINO
    tests alike; returns (bundle, build report). Tests must not modify it."""
    built = {}

    def get(method: str):
        if method not in built:
            images = write_calibration_images(tmp_path_factory.mktemp("calib"), 3)
            out = tmp_path_factory.mktemp("engines") / f"int8-{method}"
            options = bundle.BuildOptions(
                precision="int8",
                calib_images=tuple(images),
                calib_size=3,
                calib_steps=2,
                verify=False,
                quant_method=method,
            )
            built[method] = out, bundle.build_bundle(tiny_checkout, out, options)
        return built[method]

    return get


# Fixtures that need the tiny bundle (built in about a minute when the cache is cold).
BUNDLE_FIXTURES = {"tiny_bundle", "runtime_bundle"}


def pytest_collection_modifyitems(config, items):
    """Test files that need no bundle run first, each file's tests kept together (module fixtures are set up
    once): under pytest-xdist (``make test-fast``), one worker builds a cold bundle while the other runs them."""
    needs_bundle = {item.path for item in items if BUNDLE_FIXTURES & set(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: item.path in needs_bundle)


@pytest.fixture(scope="session")
def runtime_bundle(request):
    """A tiny bundle for the torch-free runtime tests: $SEESR_TEST_BUNDLE when set (CI's base-install
    run, where no torch exists to build one), else the session's tiny bundle."""
    given = os.environ.get("SEESR_TEST_BUNDLE")
    if given:
        return Path(given)
    return request.getfixturevalue("tiny_bundle")


@pytest.fixture(scope="session")
def runtime_pipeline(runtime_bundle):
    return SeeSRPipeline.from_bundle(runtime_bundle)


def write_calibration_images(folder, count: int) -> tuple:
    """``count`` small structured LR images (int8 calibration inputs); returns their paths."""
    rng = np.random.default_rng(5)
    paths = []
    for i in range(count):
        y, x = np.mgrid[0:36, 0:44]
        base = np.stack([x * (3 + i), y * (4 + i), (x + y) * 2], -1) % 256
        paths.append(folder / f"calib{i}.png")
        Image.fromarray((base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)).save(paths[-1])
    return tuple(paths)
