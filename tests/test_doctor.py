"""``seesr doctor``: its recommendation for given machines, its report of this one, the bundle check.

Torch-free (these tests also run in the base install without torch or OpenVINO: see .ci/run). The command runs
in a subprocess where importing torch raises; where a test plays a machine without OpenVINO, importing it
raises too.
"""

import json
import shlex
import subprocess
import sys
import textwrap
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import onnxruntime
import pytest
from no_torch import PRELUDE
from PIL import Image

from seesr_runtime import doctor
from seesr_runtime.cli import build_parser
from seesr_runtime.doctor import Facts, recommend
from seesr_runtime.lazy import available, install_hint
from seesr_runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]

# /proc/cpuinfo flags of the machines played (the features that matter, and a few that do not)
EPYC_ZEN5 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"})  # no AMX
XEON_AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"})
AVX2_ONLY = frozenset({"avx2", "fma", "avx_vnni"})
# OpenVINO 2026.4's OPTIMIZATION_CAPABILITIES of such CPUs' CPU device
OPENVINO_BF16 = frozenset({"BF16", "FP32", "INT8", "WINOGRAD"})
OPENVINO_NO_BF16 = frozenset({"FP32", "INT8", "BIN", "EXPORT_IMPORT"})
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

BLOCK_OPENVINO = """
class NoOpenVINO(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("openvino is not installed here")
sys.meta_path.insert(0, NoOpenVINO())
"""


def run_seesr(*args: str, without_openvino: bool = False) -> subprocess.CompletedProcess:
    """``seesr ARGS`` in a fresh interpreter where importing torch (and, if asked, openvino) raises."""
    script = (
        PRELUDE
        + (BLOCK_OPENVINO if without_openvino else "")
        + textwrap.dedent(f"""
        from seesr_runtime.cli import main
        code = main({list(args)!r})
        assert "torch" not in sys.modules
        sys.exit(code)
    """)
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def doctor_json(*args: str, without_openvino: bool = False) -> dict:
    done = run_seesr("doctor", "--json", *args, without_openvino=without_openvino)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# ---------------------------------------------------------------- the decision, on given facts


def test_epyc_with_avx512_bf16_and_no_amx_runs_openvino_bf16():
    chosen = recommend(Facts(cpu_flags=EPYC_ZEN5, openvino_cpu_capabilities=OPENVINO_BF16))
    assert chosen.arguments() == ["--backend", "openvino", "--precision", "bf16"]
    assert chosen.hints == ()


def test_the_same_epyc_without_openvino_runs_onnxruntime_fp32_and_says_what_to_install():
    chosen = recommend(Facts(cpu_flags=EPYC_ZEN5, openvino_cpu_capabilities=None))
    assert chosen.arguments() == ["--backend", "onnxruntime", "--precision", "fp32"]
    assert "bf16 units" in chosen.reason
    assert chosen.hints == ("OpenVINO bf16: pip install '.[openvino]' in the seesr-export checkout",)


def test_the_install_hints_name_extras_that_exist():
    try:
        extras = set(metadata.metadata("seesr-export").get_all("Provides-Extra"))
    except metadata.PackageNotFoundError:
        pytest.skip("seesr-export is not installed (its extras are read from the installed metadata)")
    for extra in ("openvino", "gpu"):
        assert extra in extras
        assert f"'.[{extra}]'" in install_hint(extra)


def test_xeon_with_amx_runs_openvino_bf16_or_onnxruntime_fp32_without_openvino():
    assert recommend(Facts(cpu_flags=XEON_AMX, openvino_cpu_capabilities=OPENVINO_BF16)).label == "OpenVINO bf16"
    without = recommend(Facts(cpu_flags=XEON_AMX))
    assert without.label == "onnxruntime fp32" and "'.[openvino]'" in without.hints[0]


def test_a_cpu_without_bf16_units_runs_f32():
    assert recommend(Facts(cpu_flags=AVX2_ONLY, openvino_cpu_capabilities=OPENVINO_NO_BF16)).label == "OpenVINO fp32"
    without = recommend(Facts(cpu_flags=AVX2_ONLY))
    assert without.label == "onnxruntime fp32"
    assert without.hints == ("OpenVINO fp32: pip install '.[openvino]' in the seesr-export checkout",)
    # OpenVINO's own answer wins over the flags: it is what will run
    assert recommend(Facts(cpu_flags=XEON_AMX, openvino_cpu_capabilities=OPENVINO_NO_BF16)).label == "OpenVINO fp32"


def test_unknown_flags_without_openvino_run_onnxruntime_fp32():
    chosen = recommend(Facts(cpu_flags=None))
    assert chosen.label == "onnxruntime fp32" and chosen.hints[0].startswith("OpenVINO fp32:")


def test_an_nvidia_gpu_with_the_cuda_provider_runs_onnxruntime_on_cuda():
    gpu = Facts(cpu_flags=XEON_AMX, onnxruntime_providers=CUDA_PROVIDERS, cuda_gpus=("NVIDIA H100",))
    chosen = recommend(gpu)
    assert chosen.arguments() == ["--backend", "onnxruntime", "--precision", "fp16", "--providers", "cuda", "cpu"]
    assert "NVIDIA H100" in chosen.reason
    fp32_bundle = recommend(replace(gpu, bundle_precisions=frozenset({"fp32"})))
    assert fp32_bundle.label == "onnxruntime fp32 on CUDA" and "--precision fp16" in fp32_bundle.hints[0]
    fp16_bundle = recommend(replace(gpu, bundle_precisions=frozenset({"fp32", "fp16", "fp16_gpu"})))
    assert fp16_bundle.label == "onnxruntime fp16 on CUDA"


def test_a_gpu_needs_both_the_cuda_provider_and_a_device():
    provider_only = recommend(Facts(cpu_flags=EPYC_ZEN5, onnxruntime_providers=CUDA_PROVIDERS))
    assert provider_only.label == "onnxruntime fp32"
    device_only = recommend(Facts(cpu_flags=EPYC_ZEN5, openvino_cpu_capabilities=OPENVINO_BF16, cuda_gpus=("A10",)))
    assert device_only.label == "OpenVINO bf16"
    assert device_only.hints == (
        "onnxruntime's CUDA provider would use the A10: pip install '.[gpu]' in the seesr-export checkout",
    )


# ---------------------------------------------------------------- this machine


def cpuinfo_flags() -> frozenset[str] | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((frozenset(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), frozenset())


TOP_KEYS = {
    "format",
    "version",
    "seesr_runtime",
    "system",
    "cpu",
    "memory",
    "disk",
    "engines",
    "gpus",
    "bundle",
    "recommendation",
}
RECOMMENDATION_KEYS = {"backend", "precision", "providers", "arguments", "command", "reason", "hints", "expected"}
EXPECTED_KEYS = {
    "backend",
    "precision",
    "device",
    "variant",
    "size",
    "steps",
    "seconds",
    "machine",
    "source",
    "bundle_matches",
}


def test_json_report_tells_this_machines_truth():
    report = doctor_json()
    assert set(report) == TOP_KEYS and (report["format"], report["version"]) == ("seesr-doctor", 1)
    assert set(report["system"]) == {"os", "arch", "python", "cpu_count"}
    flags = cpuinfo_flags()
    cpu = report["cpu"]
    assert set(cpu) == {"model", "flags", "features", "bf16_units"}
    if flags is None:
        assert cpu["flags"] is None and cpu["features"] is None and cpu["bf16_units"] is None
    else:
        wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_vnni", "avx_vnni")
        assert cpu["flags"] == {flag: flag in flags for flag in wanted}
        assert cpu["features"] == {
            "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": bool(flags & {"amx_bf16", "amx_int8", "amx_tile"}),
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
        }
        assert cpu["bf16_units"] == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert set(report["memory"]) == {"total_bytes", "available_bytes"}
    assert 0 < report["memory"]["available_bytes"] <= report["memory"]["total_bytes"]
    assert [set(d) for d in report["disk"]] == [{"path", "free_bytes"}] and report["disk"][0]["free_bytes"] > 0
    assert report["bundle"] is None

    engines = report["engines"]
    assert engines["onnxruntime"] == {
        "installed": True,
        "version": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
    }
    openvino = engines["openvino"]
    assert set(openvino) == {"installed", "version", "devices", "error"}
    assert openvino["installed"] == available("openvino") and openvino["error"] is None
    if openvino["installed"]:
        import openvino as ov

        core = ov.Core()
        assert openvino["version"] == ov.get_version()
        assert [d["name"] for d in openvino["devices"]] == core.available_devices
        for device in openvino["devices"]:
            assert set(device) == {"name", "full_name", "capabilities", "bf16", "precisions"}
            have = core.get_property(device["name"], "OPTIMIZATION_CAPABILITIES")
            assert device["capabilities"] == sorted(have) and device["bf16"] == ("BF16" in have)
            assert "fp32" in device["precisions"] and ("bf16" in device["precisions"]) == device["bf16"]
    assert set(engines["tensorrt"]) == {"installed", "version", "error"}
    assert engines["tensorrt"]["installed"] == available("tensorrt")
    assert all(set(gpu) == {"name", "memory_total_mb", "memory_free_mb"} for gpu in report["gpus"])

    chosen = report["recommendation"]
    assert set(chosen) == RECOMMENDATION_KEYS
    cpu_device = next((d for d in openvino["devices"] if d["name"] == "CPU"), None)
    facts = Facts(
        cpu_flags=flags,
        openvino_cpu_capabilities=frozenset(cpu_device["capabilities"]) if cpu_device else None,
        onnxruntime_providers=tuple(engines["onnxruntime"]["providers"]),
        cuda_gpus=tuple(gpu["name"] for gpu in report["gpus"]),
    )
    assert chosen["arguments"] == recommend(facts).arguments()
    # the line to type is one the real parser takes
    argv = shlex.split(chosen["command"])
    assert argv[0] == "seesr" and argv[-len(chosen["arguments"]) :] == chosen["arguments"]
    parsed = build_parser().parse_args(argv[1:])
    assert (parsed.backend, parsed.precision) == (chosen["backend"], chosen["precision"])
    if chosen["expected"] is not None:
        assert set(chosen["expected"]) == EXPECTED_KEYS and chosen["expected"]["bundle_matches"] is None


def test_without_openvino_it_recommends_onnxruntime_fp32_and_the_install():
    report = doctor_json(without_openvino=True)
    assert report["engines"]["openvino"] == {"installed": False, "version": None, "devices": [], "error": None}
    chosen = report["recommendation"]
    if report["gpus"] and "CUDAExecutionProvider" in report["engines"]["onnxruntime"]["providers"]:
        pytest.skip("this machine's recommendation is its NVIDIA GPU, with or without OpenVINO")
    assert chosen["arguments"] == ["--backend", "onnxruntime", "--precision", "fp32"]
    assert any("pip install '.[openvino]'" in hint for hint in chosen["hints"])
    assert chosen["expected"]["seconds"] > 0 and chosen["expected"]["source"].startswith("benchmarks/results/")
    text = run_seesr("doctor", without_openvino=True)
    assert text.returncode == 0, text.stderr
    assert "OpenVINO: not installed (pip install '.[openvino]'" in text.stdout
    assert "seesr upscale INPUT -o OUTPUT --bundle BUNDLE --backend onnxruntime --precision fp32" in text.stdout


def test_upscale_runs_the_same_recommendation(runtime_bundle, tmp_path):
    Image.new("RGB", (24, 20), (120, 80, 40)).save(tmp_path / "in.png")
    done = run_seesr(
        "upscale",
        str(tmp_path / "in.png"),
        "-o",
        str(tmp_path / "out"),
        "--bundle",
        str(runtime_bundle),
        "--steps",
        "1",
        "--process-size",
        "64",
        without_openvino=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = doctor.gather_facts(Manifest.load(runtime_bundle, verify="never"))
    chosen = recommend(replace(facts, openvino_cpu_capabilities=None))  # the subprocess had no OpenVINO
    assert f"note: running {chosen.label} ({chosen.reason};" in done.stderr
    assert all(f"note: faster: {hint}" in done.stderr for hint in chosen.hints)
    assert (tmp_path / "out" / "in.png").is_file()


# ---------------------------------------------------------------- the bundle


def test_bundle_is_verified_and_described(runtime_bundle):
    report = doctor_json("--bundle", str(runtime_bundle))
    manifest = Manifest.load(runtime_bundle, verify="never")
    bundle = report["bundle"]
    assert set(bundle) == {
        "path",
        "name",
        "variant",
        "files_hashed",
        "files_trusted",
        "precisions",
        "graphs",
        "tensorrt_engines",
    }
    assert bundle["name"] == manifest.data["name"] and bundle["variant"] == "standard"
    assert bundle["files_hashed"] + bundle["files_trusted"] == len(manifest.all_files())
    assert bundle["graphs"] == {n: sorted(e["files"]) for n, e in manifest.data["networks"].items()}
    assert bundle["precisions"] == sorted({p for graphs in bundle["graphs"].values() for p in graphs})
    assert "fp32" in bundle["precisions"] and bundle["tensorrt_engines"] == []
    assert [d["path"] for d in report["disk"]][1] == str(Path(runtime_bundle).resolve())
    chosen = report["recommendation"]
    assert shlex.split(chosen["command"])[5:7] == ["--bundle", str(runtime_bundle)]
    if chosen["expected"] is not None:  # the tiny bundle's networks are not the measured SD2 size
        assert chosen["expected"]["bundle_matches"] is False
    text = run_seesr("doctor", "--bundle", str(runtime_bundle))
    assert text.returncode == 0, text.stderr
    assert f"Bundle    {runtime_bundle}: {manifest.data['name']} (standard), verified" in text.stdout


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda tmp: tmp / "no-such-bundle", "not a SeeSR bundle (no manifest.json)"),
        (lambda tmp: (tmp / "manifest.json").write_text("{") and tmp, "not valid JSON"),
    ],
    ids=["missing", "broken-manifest"],
)
def test_a_bad_bundle_is_one_line_of_error(tmp_path, make, words):
    bundle = make(tmp_path)
    done = run_seesr("doctor", "--bundle", str(bundle))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {bundle}")
    assert words in done.stderr


# ---------------------------------------------------------------- the committed figures


def figure_id(row: dict) -> str:
    return f"{row['backend']}-{row['precision']}-{row['device']}-{row['variant']}"


@pytest.mark.parametrize("row", doctor.reference_figures()["figures"], ids=figure_id)
def test_reference_figures_are_those_of_their_sources(row):
    source = json.loads((ROOT / row["source"]).read_text())
    configuration = next(c for c in source["configurations"] if c["label"] == row["label"])
    assert (configuration["backend"]["name"], configuration["backend"]["precision"]) == (
        row["backend"],
        row["precision"],
    )
    result = next(r for r in configuration["results"] if r["config"]["size"] == row["size"])
    assert result["config"]["steps"] == row["measured_steps"]
    if row["measured_steps"] == row["steps"]:
        seconds = result["end_to_end"]["median_ms"] / 1000
    else:
        assert result["extrapolated"]["steps"] == row["steps"]
        seconds = result["extrapolated"]["end_to_end_s"]
    assert row["seconds"] == pytest.approx(seconds, abs=0.06)
    assert row["machine"].startswith(configuration["machine"]["gpu"] or configuration["machine"]["cpu"])
    assert source["bundle"]["name"].startswith("sd2")  # SD2-size networks, as the table's "networks" says
