"""The memory budget (seesr_runtime.memory_plan, options.PIPELINE_OPTIONS): parsing, the plan, and staged
residency on the tiny fixture, with real onnxruntime and OpenVINO sessions: a budgeted upscale makes the same
image as an unbudgeted one, loads each network only during its stage (checked through the backends' own counts
of live sessions and compiled models), and an impossible budget is refused before any network runs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seesr_runtime import SeeSRPipeline
from seesr_runtime import options as option_table
from seesr_runtime.backends import create_backend
from seesr_runtime.errors import OptionError
from seesr_runtime.lazy import available
from seesr_runtime.manifest import Manifest
from seesr_runtime.memory_plan import STAGE_NETWORKS, Activation, EngineMemory, Workload, plan_memory

FAST = {"steps": 2, "process_size": 64}
NO_OPENVINO = pytest.mark.skipif(
    not available("openvino"), reason="the openvino package is not installed (the 'openvino' extra)"
)
BACKENDS = ["onnxruntime", pytest.param("openvino", marks=NO_OPENVINO)]

# ------------------------------------------------------------------ the option

SIZES = {
    "3GB": 3 * 10**9,
    "2500MB": 2_500_000_000,
    "4GiB": 4 * 2**30,
    "3.5 GB": 3_500_000_000,
    "512MiB": 512 * 2**20,
    "4000000000": 4_000_000_000,
    "1tb": 10**12,
}


@pytest.mark.parametrize("text", SIZES)
def test_budget_strings_are_parsed(text):
    assert option_table.check("memory_budget", text) == SIZES[text]


def test_budget_in_bytes_is_taken_as_is():
    assert option_table.check("memory_budget", 4_000_000_000) == 4_000_000_000
    assert option_table.check("memory_budget", np.int64(2**32)) == 2**32


@pytest.mark.parametrize("value", ["lots", "4G", "4 GBs", "-1GB", "0", "0GB", "4.5", "", "GB", 0, -5, 2.5, True])
def test_nonsense_budgets_are_refused_naming_the_value_and_the_forms(value):
    with pytest.raises(OptionError) as caught:
        option_table.check("memory_budget", value)
    message = str(caught.value)
    assert message.startswith("memory_budget must be a positive size") and repr(value) in message + repr(value)
    assert "'4GB', '2500MB', '4GiB'" in message and caught.value.option == "memory_budget"
    assert (repr(value) if isinstance(value, str) else str(value)) in message


def test_the_budget_is_set_per_pipeline_not_per_call(runtime_pipeline):
    with pytest.raises(OptionError, match=r"memory_budget is set once for a pipeline, not per call"):
        runtime_pipeline(np.zeros((16, 16, 3), np.uint8), memory_budget="4GB", **FAST)


def test_the_budget_is_checked_before_the_bundle_loads(tmp_path):
    with pytest.raises(OptionError, match=r"memory_budget must be a positive size.*got 'plenty'"):
        SeeSRPipeline.from_bundle(tmp_path / "no-bundle-here", memory_budget="plenty")


def test_the_budget_stays_out_of_the_manifests_description():
    # per-call options only: the native runtime takes its budget in its engine options
    assert "memory_budget" not in {entry["name"] for entry in option_table.describe()}


# ------------------------------------------------------------------ the plan (no engine)

# An engine of round numbers, so the arithmetic is checked, not the calibration.
ENGINE = EngineMemory(
    base=100,
    held_per_graph_byte=0.5,
    mapped=True,
    shapes_per_segment=1,
    activations={n: Activation(1.0) for n in ("dape", "text_encoder", "vae_encoder", "vae_decoder")}
    | {"controlnet": Activation(10.0), "unet": Activation(10.0)},
)
WEIGHTS = {
    "dape": 886_000_000,
    "text_encoder": 1_361_000_000,
    "vae_encoder": 137_000_000,
    "vae_decoder": 198_000_000,
    "controlnet": 1_462_000_000,
    "unet": 3_464_000_000,
}


def workload(size: int, **changes):
    options = {**option_table.resolve({}), "process_size": size, "upscale": 4, **changes}
    return Workload.of(size // 4, size // 4, options)


def test_the_calibration_file_is_the_plans_one_source():
    """memory_calibration.json (also embedded into the native runtime) gives the engines' figures, and what it says
    of the OpenVINO backend's tiled-VAE segments is what the backend keeps."""
    from seesr_runtime import memory_plan
    from seesr_runtime.openvino_backend import SHAPES_KEPT_SEGMENTS

    data = json.loads(memory_plan.CALIBRATION_FILE.read_text())
    assert set(memory_plan.ENGINE_MEMORY) == {tuple(key.split(" ")) for key in data["engines"]}
    bf16 = memory_plan.ENGINE_MEMORY[("openvino", "bf16")]
    assert bf16.held_per_graph_byte == data["engines"]["openvino bf16"]["held_per_graph_byte"]
    assert bf16.activations["unet"] == Activation(*data["engines"]["openvino bf16"]["activations"]["unet"])
    for key in (("openvino", "bf16"), ("openvino", "fp32")):
        assert memory_plan.ENGINE_MEMORY[key].shapes_per_segment == SHAPES_KEPT_SEGMENTS
    assert memory_plan.STAGES == tuple(data["stages"]) and memory_plan.LATENT_TILES == tuple(data["latent_tiles"])


def test_without_a_budget_everything_stays_resident():
    plan = plan_memory(workload(512), WEIGHTS, ENGINE, "test", None)
    assert not plan.staged and [s.name for s in plan.stages] == ["tag", "prompt", "encode", "denoise", "decode"]
    denoise = plan.stages[3]
    assert denoise.kept == int(0.5 * (886_000_000 + 1_361_000_000)) + int(0.5 * 137_000_000)


def test_a_budget_stages_the_networks_and_the_peak_is_the_largest_stage():
    plan = plan_memory(workload(512), WEIGHTS, ENGINE, "test", 4 * 10**9)
    assert plan.staged and all(stage.kept == 0 for stage in plan.stages)
    denoise = next(s for s in plan.stages if s.name == "denoise")
    assert denoise.weights == int(0.5 * 1_462_000_000) + int(0.5 * 3_464_000_000)
    assert plan.peak == denoise.peak <= 4 * 10**9 and not plan.changed
    text = "\n".join(plan.lines())
    assert "staged" in text and "controlnet+unet" in text and "estimated peak" in text


def test_an_impossible_budget_names_the_smallest_that_would_do():
    smallest = plan_memory(workload(512), WEIGHTS, ENGINE, "test", 10**12).peak
    with pytest.raises(OptionError) as caught:
        plan_memory(workload(512), WEIGHTS, ENGINE, "test", 2 * 10**9)
    needed = float(str(caught.value).split("needs at least ")[1].split("GB")[0]) * 10**9
    assert smallest <= needed < smallest + 10**7
    assert "denoise: controlnet+unet" in str(caught.value) and caught.value.option == "memory_budget"


def test_loading_embedded_weights_counts_until_they_are_prepared():
    engine = EngineMemory(100, 0.5, ENGINE.activations, mapped=True, load_per_embedded_byte=2.0)
    embedded = {name: size for name, size in WEIGHTS.items() if name != "unet"}  # the UNet's are external
    roomy = plan_memory(workload(512), WEIGHTS, engine, "test", 10**12, embedded=embedded)
    denoise = next(s for s in roomy.stages if s.name == "denoise")
    assert denoise.loading == 2 * WEIGHTS["controlnet"]  # the ControlNet read through its protobuf, nothing held yet
    with pytest.raises(OptionError, match="loading reads the weights embedded in its graph files twice"):
        plan_memory(workload(512), WEIGHTS, engine, "test", 2_800_000_000, embedded=embedded)
    prepared = plan_memory(workload(512), WEIGHTS, engine, "test", 2_800_000_000, embedded=embedded, prepared=WEIGHTS)
    assert all(stage.loading == stage.weights for stage in prepared.stages if stage.name in ("tag", "denoise"))


def test_large_decodes_spill_before_they_change_the_image():
    big = workload(2048)
    roomy = plan_memory(big, WEIGHTS, ENGINE, "test", 10**12)
    decode = next(s for s in roomy.stages if s.name == "decode")
    # a budget just under the in-memory decode: the waiting tiles go to files, the tiles stay the official ones
    budget = max(decode.peak - 1, max(s.peak for s in roomy.stages if s.name != "decode"))
    plan = plan_memory(big, WEIGHTS, ENGINE, "test", budget)
    assert "vae_decoder" in plan.spill and plan.vae_decoder_tile_size == 224 and not plan.changed


def test_latent_tiles_shrink_only_when_the_denoiser_does_not_fit():
    engine = EngineMemory(100, 0.01, {n: Activation(1.0, 1.0) for n in WEIGHTS}, mapped=True)
    big = workload(1024)  # 128 latent px: four 96-px tiles
    roomy = plan_memory(big, WEIGHTS, engine, "test", 10**12)
    denoise = next(s for s in roomy.stages if s.name == "denoise")
    plan = plan_memory(big, WEIGHTS, engine, "test", denoise.peak - 1)
    assert plan.latent_tile_size < 96 and plan.changed == (f"latent_tile_size 96 -> {plan.latent_tile_size}",)


def test_the_denoiser_takes_int8_linear_weights_before_smaller_tiles_where_the_engine_keeps_them():
    engine = EngineMemory(100, 0.5, ENGINE.activations, mapped=True, int8_linear_held_per_graph_byte=0.4)
    roomy = plan_memory(workload(512), WEIGHTS, engine, "test", 10**12)
    denoise = next(s for s in roomy.stages if s.name == "denoise")
    plan = plan_memory(workload(512), WEIGHTS, engine, "test", denoise.peak - 1)
    assert plan.int8_linear == ("controlnet", "unet") and plan.latent_tile_size == 96
    assert plan.changed == ("int8 weights in the linear layers of controlnet, unet",)
    squeezed = next(s for s in plan.stages if s.name == "denoise")
    assert squeezed.weights == int(0.4 * WEIGHTS["controlnet"]) + int(0.4 * WEIGHTS["unet"])
    # an engine without the lever shrinks the latent tiles instead (more, smaller windows per step)
    tiled = plan_memory(workload(512), WEIGHTS, ENGINE, "test", denoise.peak - 1)
    assert tiled.int8_linear == () and tiled.latent_tile_size < 64


# ------------------------------------------------------------------ staged residency, real engines


class Watched:
    """A backend as it is, except that before every network call it notes which networks the backend itself
    says are loaded (its ``resident()``: live sessions or compiled models)."""

    def __init__(self, backend):
        self.inner, self.name, self.seen = backend, backend.name, []

    def run(self, network, feeds):
        self.seen.append((network, set(self.inner.resident())))
        return self.inner.run(network, feeds)

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)


def _backend(kind, manifest, mapped=False):
    options = {"precision": "bf16", "map_weights": mapped} if kind == "openvino" else {}
    return create_backend(kind, manifest, **options)


def _stage_of(network):
    return next(stage for stage, names in STAGE_NETWORKS.items() if network.partition("#")[0] in names)


TILED = {"upscale": 8, "vae_decoder_tile_size": 24, "latent_tile_size": 32}  # latent and VAE tiles, 4 and 2


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        pytest.param("onnxruntime", {}, id="untiled-onnxruntime"),
        pytest.param("openvino", {}, id="untiled-openvino", marks=NO_OPENVINO),
        pytest.param("onnxruntime", TILED, id="tiled-onnxruntime"),
        # every tile shape of every VAE segment compiled twice (free and budgeted): minutes
        pytest.param("openvino", TILED, id="tiled-openvino", marks=[NO_OPENVINO, pytest.mark.slow]),
    ],
)
def test_budgeted_upscale_is_the_same_image_with_networks_loaded_only_in_their_stage(
    runtime_bundle, lr_image, kind, options
):
    manifest = Manifest.load(runtime_bundle)
    free = SeeSRPipeline(manifest, _backend(kind, manifest))
    expected = free(lr_image, seed=3, **FAST, **options)
    assert len(free.backend.resident()) >= 6  # without a budget every network stays loaded

    watched = Watched(_backend(kind, manifest, mapped=True))
    budget = expected.memory_plan.peak if expected.memory_plan else None
    pipe = SeeSRPipeline(manifest, watched, memory_budget=budget or "1TB")
    in_loop = []
    result = pipe(lr_image, seed=3, callback=lambda i, t: in_loop.append(watched.resident()), **FAST, **options)

    assert result.image.tobytes() == expected.image.tobytes()
    assert result.memory_plan is not None and result.memory_plan.staged
    assert in_loop == [{"controlnet": 1, "unet": 1}] * FAST["steps"]
    for network, loaded in watched.seen:  # at every call: only networks of the running stage
        stage = _stage_of(network)
        assert {_stage_of(n) for n in loaded} <= {stage}, (network, loaded)
        if "#" in network:  # tiled VAE: one segment loaded at a time, the one running
            assert loaded <= {network}, (network, loaded)
    assert any("#" in network for network, _ in watched.seen) == ("vae_decoder_tile_size" in options)
    assert watched.resident() == {}  # the last stage freed its network too

    if not options:  # the networks load again for the next image (once: OpenVINO compiles are slow)
        again = pipe(lr_image, seed=3, **FAST, **options)
        assert again.image.tobytes() == expected.image.tobytes() and watched.resident() == {}


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_budget_frees_what_an_earlier_call_left_loaded(runtime_bundle, lr_image, kind):
    manifest = Manifest.load(runtime_bundle)
    watched = Watched(_backend(kind, manifest))
    SeeSRPipeline(manifest, watched)(lr_image, **FAST)  # no budget: everything stays
    assert len(watched.resident()) >= 6
    watched.seen.clear()
    SeeSRPipeline(manifest, watched, memory_budget="1TB")(lr_image, **FAST)
    first_call, loaded = watched.seen[0]
    assert first_call == "dape" and loaded <= {"dape"}


@pytest.mark.parametrize("kind", BACKENDS)
def test_an_impossible_budget_is_refused_before_any_network_loads(runtime_bundle, lr_image, kind):
    manifest = Manifest.load(runtime_bundle)
    watched = Watched(_backend(kind, manifest, mapped=True))
    pipe = SeeSRPipeline(manifest, watched, memory_budget="1MB")
    with pytest.raises(OptionError) as caught:
        pipe(lr_image, **FAST)
    message = str(caught.value)
    assert message.startswith("memory_budget 1 MB is below the smallest plan for this bundle")
    assert "it needs at least " in message and "GB" in message.split("it needs at least ")[1]
    assert watched.seen == [] and watched.resident() == {}
    smallest = message.split("it needs at least ")[1].split(" ")[0]
    assert SeeSRPipeline(manifest, watched, memory_budget=smallest)(lr_image, **FAST).image.size == (224, 160)


def test_a_budget_needs_a_backend_that_can_free_networks(runtime_bundle):
    manifest = Manifest.load(runtime_bundle)

    class Fixed:  # runs networks but cannot free them (as the TensorRT backend)
        name = "fixed"

        def run(self, network, feeds):
            raise AssertionError("never called")

    with pytest.raises(OptionError, match=r"memory_budget plans host memory for the CPU backends"):
        SeeSRPipeline(manifest, Fixed(), memory_budget="4GB")


# ------------------------------------------------------------------ the command line


def _upscale(bundle, lr_file, out, *extra):
    script = "import sys\nfrom seesr_runtime.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = [str(lr_file), "-o", str(out), "--bundle", str(bundle), "--backend", "onnxruntime", *extra]
    return subprocess.run([sys.executable, "-c", script, "upscale", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def lr_file(tmp_path, lr_image):
    path = tmp_path / "lr.png"
    lr_image.save(path)
    return path


def test_cli_refuses_a_nonsense_budget_in_one_line(runtime_bundle, lr_file, tmp_path):
    done = _upscale(runtime_bundle, lr_file, tmp_path / "out", "--memory-budget", "lots", "-q")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: memory_budget must be " + option_table.BYTE_SIZE_FORMS + ", got 'lots'"
    ]


def test_cli_prints_the_plan_and_makes_the_same_image(runtime_bundle, lr_file, tmp_path):
    free = _upscale(runtime_bundle, lr_file, tmp_path / "free", "--steps", "2", "--process-size", "64", "-q")
    budgeted = _upscale(
        runtime_bundle,
        lr_file,
        tmp_path / "budget",
        "--steps",
        "2",
        "--process-size",
        "64",
        "--memory-budget",
        "1TB",
        "-v",
    )
    assert free.returncode == 0 and budgeted.returncode == 0, budgeted.stderr[-2000:]
    assert "memory plan (onnxruntime fp32, budget 1 TB): staged" in budgeted.stderr
    assert "memory: stage denoise starts (controlnet+unet)" in budgeted.stderr
    with Image.open(tmp_path / "free" / "lr.png") as a, Image.open(tmp_path / "budget" / "lr.png") as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.skipif(not available("openvino"), reason="the openvino package is not installed (the 'openvino' extra)")
def test_openvino_keeps_int8_linear_weights_in_int8_and_close_to_bf16(runtime_bundle):
    from seesr_runtime.networks import dummy_feeds

    manifest = Manifest.load(runtime_bundle)
    plain, compressed = (create_backend("openvino", manifest, precision="bf16") for _ in range(2))
    compressed.compress_linear(["unet"])
    feeds = dummy_feeds(manifest.spec("unet"), {"B": 2, "h": 16, "w": 24})
    expected, got = plain.run("unet", feeds)[0], compressed.run("unet", feeds)[0]
    runtime = compressed.network("unet").models()[0].main.get_runtime_model()
    linear = [
        (op.get_rt_info()["runtimePrecision"].astype(str), op.input_value(1).get_partial_shape().to_shape())
        for op in runtime.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"
    ]
    # the plugin kept the linear layers' weights in int8 (all at SD2 size; this fixture's 32x32 ones, too small
    # to be worth it, it runs in bf16)
    larger = [precision for precision, shape in linear if np.prod(shape) > 32 * 32]
    assert larger and set(larger) == {"i8"}
    assert 0 < np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.05


def test_bench_records_the_plan_under_a_budget(runtime_bundle, tmp_path):
    script = "import sys\nfrom seesr_runtime.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["bench", "--bundle", str(runtime_bundle), "--size", "64", "--steps", "1", "--runs", "1", "--warmup", "0"]
    done = subprocess.run(
        [sys.executable, "-c", script, *args, "--memory-budget", "1TB", "--json", str(tmp_path / "b.json"), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads((tmp_path / "b.json").read_text())["results"][0]["memory_plan"]
    assert plan["staged"] and plan["budget"] == 10**12 and plan["peak"] <= plan["budget"]
    assert [stage["name"] for stage in plan["stages"]] == ["tag", "prompt", "encode", "denoise", "decode"]
