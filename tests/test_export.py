"""ONNX export and the bundle: parity with torch, manifest contract, caching, atomicity, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TOKENIZER_TEXTS
from tokenizers import Tokenizer

from seesr_export import export_networks
from seesr_export.build_request import _tensorrt_missing
from seesr_export.bundle import BuildOptions, build_bundle
from seesr_export.cli import main as cli_main
from seesr_export.export import ExportOptions, export_onnx, graph_modules, model_dims, run_torch, sample_feeds
from seesr_export.parity import relative_l2
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import NETWORK_NAMES, network_specs

ENVS = [{"B": 1, "h": 8, "w": 8}, {"B": 2, "h": 12, "w": 20}]  # square and not, batch 1 and 2


@pytest.fixture(scope="module")
def modules(reference):
    return graph_modules(reference)


@pytest.mark.parametrize("env", ENVS, ids=lambda env: "B{B}-{h}x{w}".format(**env))
@pytest.mark.parametrize("network", NETWORK_NAMES)
def test_fp32_graph_matches_torch(network, env, tiny_bundle, modules):
    manifest = Manifest.load(tiny_bundle)
    spec = manifest.spec(network)
    session = ort.InferenceSession(str(manifest.graph_path(network, "fp32")), providers=["CPUExecutionProvider"])
    feeds = sample_feeds(spec, env, seed=env["h"])
    expected = run_torch(modules[network], spec, feeds)
    got = session.run(spec.output_names, feeds)
    for name, g, e in zip(spec.output_names, got, expected):
        assert g.shape == e.shape == spec.outputs[spec.output_names.index(name)].concrete_shape(env)
        assert relative_l2(g, e) <= 1e-5, (network, env, name, relative_l2(g, e))


@pytest.mark.parametrize("network", NETWORK_NAMES)
def test_fp16_graph_runs_with_fp32_io_and_fp32_attention(network, tiny_bundle, modules):
    manifest = Manifest.load(tiny_bundle)
    spec = manifest.spec(network)
    path = manifest.graph_path(network, "fp16")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert all(i.type == ("tensor(int64)" if i.name == "input_ids" else "tensor(float)") for i in session.get_inputs())
    feeds = sample_feeds(spec, ENVS[1], seed=3)
    expected = run_torch(modules[network], spec, feeds)
    for g, e in zip(session.run(spec.output_names, feeds), expected):
        assert relative_l2(g, e) <= 2e-2  # measured 1e-3 .. 5e-3 on the tiny fixture
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    # Scores reach the softmax from an fp32 MatMul (through scale, bias, mask), never through a Cast.
    for softmax in softmaxes:
        node = producers[softmax.input[0]]
        while node.op_type in ("Add", "Mul", "Div", "Reshape"):
            node = producers[node.input[0]]
        assert node.op_type == "MatMul", (softmax.name, node.op_type)


def test_external_data_path(reference, tmp_path):
    dims = model_dims(reference.dape, reference.text_encoder, reference.controlnet, 4)
    spec = network_specs(dims)["vae_decoder"]
    module = graph_modules(reference)["vae_decoder"]
    files = export_onnx(
        module, spec, {"B": 1, "h": 8, "w": 8}, tmp_path / "vae_decoder.onnx", ExportOptions(external_data_threshold=0)
    )
    assert [f.name for f in files] == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert files[1].stat().st_size > files[0].stat().st_size  # the weights live in the data file
    onnx.checker.check_model(str(files[0]), full_check=True)
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    feeds = sample_feeds(spec, {"B": 1, "h": 10, "w": 6})
    assert relative_l2(session.run(None, feeds)[0], run_torch(module, spec, feeds)[0]) <= 1e-5


def test_manifest_validates_and_hashes_match(tiny_bundle):
    schema = json.loads((Path(__import__("seesr_runtime").__file__).parent / "manifest.schema.json").read_text())
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    jsonschema.validate(data, schema)
    manifest = Manifest.load(tiny_bundle)
    manifest.verify_files()
    assert set(manifest.data["networks"]) == set(NETWORK_NAMES)
    assert len(data["tagger"]["tags"]) == len(data["tagger"]["thresholds"]) == 4585
    assert data["pipeline"]["scheduler"]["steps_offset"] == 1
    assert len(manifest.spec("unet").inputs) == 4 + 13  # sample, timestep, text, image, 12 down + mid


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_tokenizer_json_matches_clip_tokenizer(tiny_bundle, reference, text):
    tokenizer = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    expected = reference.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenizer.encode(text).ids == expected


def test_negative_prompt_embedding_is_precomputed(tiny_bundle, reference):
    saved = np.load(tiny_bundle / "negative_prompt_embeds.npy")
    expected = reference.encode_text("dotted, noise, blur, lowres, smooth").numpy()
    assert saved.shape == expected.shape and np.allclose(saved, expected, atol=1e-6)


def test_rebuild_is_a_cache_hit(tiny_checkout, tiny_bundle, monkeypatch):
    """A rebuild of unchanged inputs does no work: nothing is traced to ONNX or run through torch for a
    parity check (both are made to fail here), and the bundle keeps the very same graph files."""

    def inodes():
        return {
            str(p.relative_to(tiny_bundle)): p.stat().st_ino for p in (tiny_bundle / "onnx").rglob("*") if p.is_file()
        }

    def refuse(what):
        def call(*args, **kwargs):
            raise AssertionError(f"a cache hit called {what}")

        return call

    before = inodes()
    for name in ("export_onnx", "run_torch"):
        monkeypatch.setattr(export_networks, name, refuse(name))  # where the build calls them
    report = build_bundle(tiny_checkout, tiny_bundle, BuildOptions(precision="fp16"))
    assert report.exported == [] and sorted(report.reused) == sorted(NETWORK_NAMES)
    assert before == inodes()  # hard links to the same graphs (tiled-VAE segments included)
    Manifest.load(tiny_bundle).verify_files()


def _build_in_subprocess(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "seesr_export.cli", "build", *args], env=env, stderr=subprocess.PIPE, text=True, **kwargs
    )


def _wait_for(process, marker, timeout=120):
    deadline = time.time() + timeout
    for line in process.stderr:
        if marker in line:
            return
        assert time.time() < deadline
    pytest.fail(f"build ended before {marker!r}")


@pytest.mark.slow
def test_killed_build_leaves_no_bundle(tiny_checkout, tmp_path):
    root = tiny_checkout.sd2.parents[2]
    out = tmp_path / "engines" / "killed"
    process = _build_in_subprocess(["--seesr-root", str(root), "--out", str(out)])
    _wait_for(process, "unet: tracing")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    # The next build to the same name clears the leftover partial directory and succeeds.
    build_bundle(tiny_checkout, out, BuildOptions(networks=("vae_decoder",), verify=False))
    assert (out / "manifest.json").exists()
    assert not list(out.parent.glob(".killed.partial-*"))


@pytest.mark.slow
def test_killed_rebuild_keeps_the_previous_bundle(tiny_checkout, tmp_path):
    root = tiny_checkout.sd2.parents[2]
    out = tmp_path / "engines" / "kept"
    build_bundle(tiny_checkout, out, BuildOptions(networks=("vae_decoder",), verify=False))
    process = _build_in_subprocess(["--seesr-root", str(root), "--out", str(out), "--precision", "fp16"])
    _wait_for(process, "tracing")
    process.send_signal(signal.SIGKILL)
    process.wait()
    manifest = Manifest.load(out)
    manifest.verify_files()
    assert list(manifest.data["networks"]) == ["vae_decoder"]


def _cli_error(capsys, args):
    code = cli_main(["build", *args])
    err = capsys.readouterr().err
    assert code != 0
    return err


def _copy(tiny_checkout, tmp_path):
    shutil.copytree(tiny_checkout.sd2.parents[2], tmp_path / "checkout")
    return tmp_path / "checkout"


def _delete_dape(root):
    (root / "preset" / "models" / "DAPE.pth").unlink()


def _garble_dape(root):
    (root / "preset" / "models" / "DAPE.pth").write_bytes(b"\x00garbage")


def _truncate_tag_list(root):
    tags = root / "ram" / "data" / "ram_tag_list.txt"
    tags.write_text("\n".join(tags.read_text().splitlines()[:100]) + "\n")


@pytest.mark.parametrize(
    "damage, extra, expected",
    [
        (_delete_dape, [], ["DAPE.pth", "missing SeeSR inputs"]),
        (_garble_dape, ["--no-verify"], ["cannot read", "DAPE.pth"]),
        (_truncate_tag_list, ["--networks", "vae_decoder"], ["ram_tag_list.txt", "4585"]),
    ],
    ids=["missing-dape", "garbage-dape", "short-tag-list"],
)
def test_bad_inputs_get_one_clear_message(tiny_checkout, tmp_path, capsys, damage, extra, expected):
    root = _copy(tiny_checkout, tmp_path)
    damage(root)
    out = tmp_path / "engines" / "bad"
    err = _cli_error(capsys, ["--seesr-root", str(root), "--out", str(out), *extra])
    assert [text for text in expected if text not in err] == []
    assert not out.exists()


def test_output_that_is_not_a_bundle_is_left_alone(tiny_checkout, tmp_path, capsys):
    not_a_bundle = tmp_path / "photos"
    not_a_bundle.mkdir()
    (not_a_bundle / "holiday.jpg").write_bytes(b"jpeg")
    err = _cli_error(capsys, ["--seesr-root", str(tiny_checkout.sd2.parents[2]), "--out", str(not_a_bundle)])
    assert "not a SeeSR bundle" in err and str(not_a_bundle) in err
    assert (not_a_bundle / "holiday.jpg").exists()


@pytest.mark.skipif(
    _tensorrt_missing() is None,
    reason="TensorRT and an NVIDIA GPU are here: --backend tensorrt builds engines instead of refusing",
)
def test_tensorrt_build_is_refused_where_unavailable(tiny_checkout, tmp_path, capsys):
    root = str(tiny_checkout.sd2.parents[2])
    err = _cli_error(capsys, ["--seesr-root", root, "--out", str(tmp_path / "trt"), "--backend", "tensorrt"])
    assert "tensorrt" in err and "--backend onnx" in err
    assert not (tmp_path / "trt").exists()


def test_int8_without_calibration_images_is_refused(tiny_checkout, tmp_path, capsys):
    root = str(tiny_checkout.sd2.parents[2])
    err = _cli_error(capsys, ["--seesr-root", root, "--out", str(tmp_path / "q"), "--precision", "int8"])
    assert "--precision int8 needs --calib-images" in err


def test_build_help_documents_precisions_and_backends():
    done = subprocess.run([sys.executable, "-m", "seesr_export.cli", "build", "--help"], capture_output=True, text=True)
    expected = [
        "fp32",
        "fp16",
        "int8",
        "--calib-images",
        "--calib-size",
        "--calib-steps",
        "--quant-method",
        "tensorrt",
        "needs an NVIDIA GPU",
        "--networks",
        "--external-data-threshold-mb",
        "--no-verify",
    ]
    assert [text for text in expected if text not in done.stdout] == []
