"""A SeeSR-turbo bundle served by a real tritonserver: the model repository of ``seesr-export triton``,
one request at the bundle's defaults (2 steps, guidance 1.0), the same bytes as the in-process runtime.

Runs where test_triton.py's server tests run (`make test-triton`, which builds the tiny turbo bundle on the
torch side and names it in SEESR_TEST_TURBO_BUNDLE); with torch at hand the bundle is built here instead.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_triton import REQUIRED, _server_missing, call, needs_server, write_repo
from triton_server import TritonServer

from seesr_export.turbo_options import TURBO_DEFAULTS  # torch-free
from seesr_runtime import SeeSRPipeline
from seesr_runtime.lazy import available
from seesr_runtime.triton import SERVICE_VERSION

PROCESS_SIZE = 64  # tiny working size: seconds per request on CPU


def _unavailable(reason: str):
    return (pytest.fail if REQUIRED else pytest.skip)(reason)


@pytest.fixture(scope="module")
def turbo_runtime_bundle(request, tmp_path_factory):
    """$SEESR_TEST_TURBO_BUNDLE (the torch-free Triton env, where no torch exists to build one), else an
    fp32 turbo bundle of the session's tiny checkout."""
    given = os.environ.get("SEESR_TEST_TURBO_BUNDLE")
    if given:
        return Path(given)
    if not available("torch"):
        _unavailable("no torch here to build a turbo bundle: set SEESR_TEST_TURBO_BUNDLE (`make test-triton` does)")
    from seesr_export.bundle import BuildOptions, build_bundle
    from seesr_export.turbo_options import default_sd_turbo

    checkout = request.getfixturevalue("tiny_checkout")
    out = tmp_path_factory.mktemp("turbo") / "tiny-turbo"
    sd_turbo = default_sd_turbo(checkout.sd2.parents[2])  # sd2 is ROOT/preset/models/stable-diffusion-2-base
    build_bundle(checkout, out, BuildOptions(precision="fp32", sd_turbo=sd_turbo, verify=False))
    return out


@pytest.fixture(scope="module")
def turbo_server(request, tmp_path_factory):
    reason = _server_missing()
    if reason:
        _unavailable(reason)
    bundle = request.getfixturevalue("turbo_runtime_bundle")  # built only where a server can run
    work = tmp_path_factory.mktemp("triton-turbo")
    repo = work / "model_repository"
    # One thread, as the in-process pipeline below: same arithmetic, same bytes out.
    extra = ("--instances", "1", "--threads", "1", "--option", f"process_size={PROCESS_SIZE}")
    assert write_repo(bundle, repo, *extra) == 0
    served = json.loads((repo / "seesr" / str(SERVICE_VERSION) / "bundle" / "manifest.json").read_text())
    assert served["pipeline"]["variant"] == "turbo"
    with TritonServer(repo, work) as running:
        yield running
    assert not running.alive()


@needs_server
def test_turbo_bundle_served_matches_in_process_runtime_at_its_defaults(turbo_server, turbo_runtime_bundle, lr_image):
    pipeline = SeeSRPipeline.from_bundle(turbo_runtime_bundle, threads=1)
    assert {k: pipeline.resolve_options({})[k] for k in TURBO_DEFAULTS} == TURBO_DEFAULTS
    steps = []
    expected = pipeline(lr_image, seed=3, process_size=PROCESS_SIZE, callback=lambda i, t: steps.append(t))
    assert steps == [999, 499]  # the trailing schedule at the bundle's 2 steps
    got = call(turbo_server, "http", np.asarray(lr_image), seed=3)  # no steps, no guidance: the bundle's
    assert got.image.dtype == np.uint8 and got.image.shape == (160, 224, 3)
    assert np.array_equal(got.image, np.asarray(expected.image))
    assert (got.tags, got.prompt) == (expected.tags, expected.prompt)
    # The equality pins the steps the server ran: a third step changes the picture.
    other = pipeline(lr_image, seed=3, process_size=PROCESS_SIZE, steps=3)
    assert not np.array_equal(got.image, np.asarray(other.image))
