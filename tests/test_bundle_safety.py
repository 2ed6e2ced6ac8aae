"""Bundles stay inside themselves, their files are verified on load by default, and what we write gets
the user's umask permissions.

Every test works on its own copy of a bundle (``copy_of``); the session's bundle (``runtime_bundle``) is never changed.
"""

import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from seesr_export.atomic import swap_into_place
from seesr_export.bundle import BuildOptions, build_bundle
from seesr_runtime import SeeSRPipeline
from seesr_runtime.backends import OnnxRuntimeBackend
from seesr_runtime.cli import build_parser, main
from seesr_runtime.errors import BundleError, OptionError
from seesr_runtime.filemodes import write_atomically
from seesr_runtime.manifest import MANIFEST, Manifest, sha256_file
from seesr_runtime.verification import RACY_NS, STAMP, stamp_locations


def copy_of(bundle: Path, folder: Path) -> Path:
    copy = folder / "bundle"
    shutil.copytree(bundle, copy, symlinks=True)
    return copy


def edit_manifest(bundle: Path, change) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    change(data)
    (bundle / MANIFEST).write_text(json.dumps(data, indent=1))


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def wait_past_racy_window() -> None:
    """Files written less than RACY_NS before a check are not stamped (see verification.py): wait once."""
    time.sleep(RACY_NS / 1e9 + 0.1)


def refused(call, *fragments) -> str:
    """The message of the BundleError ``call`` raises (exactly that type), which must contain ``fragments``."""
    with pytest.raises(BundleError) as caught:
        call()
    assert type(caught.value) is BundleError
    message = str(caught.value)
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    return message


def graph_rel(bundle: Path, network: str = "vae_decoder") -> str:
    return json.loads((bundle / MANIFEST).read_text())["networks"][network]["files"]["fp32"]["onnx"]


# ---------------------------------------------------------------- paths stay inside the bundle


def test_absolute_graph_path_is_refused(runtime_bundle, tmp_path):
    copy = copy_of(runtime_bundle, tmp_path)
    edit_manifest(copy, lambda d: d["networks"]["vae_decoder"]["files"]["fp32"].update(onnx="/etc/passwd"))
    message = refused(
        lambda: Manifest.load(copy, verify="never"), copy, "'/etc/passwd'", "absolute path", "vae_decoder fp32 graph"
    )
    assert "protobuf" not in message


def test_climbing_path_is_refused(runtime_bundle, tmp_path):
    copy = copy_of(runtime_bundle, tmp_path)
    escape = "../../../../../../etc/passwd"
    edit_manifest(copy, lambda d: d["text"].update(tokenizer=escape))
    refused(lambda: Manifest.load(copy), copy, repr(escape), "climbs out of the bundle", "text tokenizer")


def test_climbing_sha256_entry_is_refused_before_hashing(runtime_bundle, tmp_path):
    """verify would otherwise hash (read) a file outside the bundle."""
    copy = copy_of(runtime_bundle, tmp_path)
    (tmp_path / "secret").write_text("not the bundle's")
    edit_manifest(copy, lambda d: d["files"].update({"../secret": "0" * 64}))
    refused(lambda: Manifest.load(copy), copy, "'../secret'", "climbs out of the bundle")


@pytest.mark.parametrize("linked", ["tokenizer.json", "onnx/fp32"])
def test_symlink_out_of_the_bundle_is_refused(runtime_bundle, tmp_path, linked):
    """Same contents (the sha256 would match): only the link's target is wrong."""
    copy = copy_of(runtime_bundle, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    moved = outside / Path(linked).name
    shutil.move(copy / linked, moved)
    (copy / linked).symlink_to(moved, target_is_directory=moved.is_dir())
    refused(
        lambda: Manifest.load(copy), copy, linked, "leads outside the bundle through a symbolic link", moved.resolve()
    )


def test_symlink_inside_the_bundle_is_followed(runtime_bundle, tmp_path):
    copy = copy_of(runtime_bundle, tmp_path)
    (copy / "shared").mkdir()
    shutil.move(copy / "tokenizer.json", copy / "shared" / "tokenizer.json")
    (copy / "tokenizer.json").symlink_to(Path("shared") / "tokenizer.json")
    manifest = Manifest.load(copy)
    assert manifest.file("tokenizer.json") == (copy / "shared" / "tokenizer.json").resolve()


# ---------------------------------------------------------------- external data


@pytest.fixture(scope="module")
def external_data_bundle(tiny_checkout, tmp_path_factory):
    """A vae_decoder-only bundle whose graphs keep their weights in external data, built under umask 022."""
    out = tmp_path_factory.mktemp("external") / "bundle"
    previous = os.umask(0o022)
    try:
        build_bundle(
            tiny_checkout, out, BuildOptions(networks=("vae_decoder",), verify=False, external_data_threshold=0)
        )
    finally:
        os.umask(previous)
    return out


def relocate_external_data(bundle: Path, location: str, data_target: Path, pin: bool) -> Path:
    """Point the vae_decoder fp32 graph's external data at ``location`` (the data moved to ``data_target``),
    re-pinning the graph's sha256 so that only the location is wrong; ``pin``: list the data file too."""
    rel = graph_rel(bundle)
    graph = bundle / rel
    data_rel = f"{rel}.data"
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    graph.write_bytes(model.SerializeToString())
    data_target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(bundle / data_rel, data_target)

    def repin(d):
        files = d["networks"]["vae_decoder"]["files"]["fp32"]
        files["sha256"] = {rel: sha256_file(graph)}
        files["external_data"] = None
        if pin:
            pinned = data_target.relative_to(bundle).as_posix()
            files["sha256"][pinned] = sha256_file(data_target)
            files["external_data"] = pinned

    edit_manifest(bundle, repin)
    return graph


def decode_zeros(bundle: Path) -> np.ndarray:
    """The vae_decoder of ``bundle`` run by onnxruntime on a zero latent."""
    manifest = Manifest.load(bundle)
    latent = manifest.spec("vae_decoder").inputs[0]
    feeds = {latent.name: np.zeros(latent.concrete_shape({"B": 1, "h": 8, "w": 8}), np.float32)}
    return OnnxRuntimeBackend(manifest).run("vae_decoder", feeds)[0]


def test_external_data_bundle_loads_and_runs(external_data_bundle):
    assert (external_data_bundle / f"{graph_rel(external_data_bundle)}.data").is_file()
    assert np.isfinite(decode_zeros(external_data_bundle)).all()


def test_external_data_outside_the_bundle_is_refused(external_data_bundle, tmp_path):
    copy = copy_of(external_data_bundle, tmp_path)
    escape = "../../../outside.data"  # from onnx/fp32/: the bundle's parent folder
    relocate_external_data(copy, escape, tmp_path / "outside.data", pin=False)
    refused(
        lambda: decode_zeros(copy),
        copy,
        f"external data {escape!r} of graph {graph_rel(copy)!r}",
        "climbs out of the bundle",
    )


def test_external_data_not_pinned_by_the_manifest_is_refused(external_data_bundle, tmp_path):
    copy = copy_of(external_data_bundle, tmp_path)
    relocate_external_data(copy, "other.data", copy / "onnx" / "fp32" / "other.data", pin=False)
    refused(
        lambda: decode_zeros(copy),
        copy,
        "external data 'other.data' of graph",
        "not one of the graph's files in the manifest",
    )


def test_external_data_moved_and_pinned_runs(external_data_bundle, tmp_path):
    """The check follows the graph's own locations, not a naming convention."""
    copy = copy_of(external_data_bundle, tmp_path)
    relocate_external_data(copy, "weights/decoder.bin", copy / "onnx" / "fp32" / "weights" / "decoder.bin", pin=True)
    assert np.array_equal(decode_zeros(copy), decode_zeros(external_data_bundle))


# ---------------------------------------------------------------- sha256 by default, through the stamp


def test_flipped_byte_is_refused_on_load_by_default(runtime_bundle, tmp_path):
    copy = copy_of(runtime_bundle, tmp_path)
    rel = graph_rel(copy, "unet")
    flip_byte(copy / rel)
    refused(lambda: SeeSRPipeline.from_bundle(copy), copy, rel, "sha256", "do not match the manifest")


def test_stamped_load_hashes_only_what_changed(runtime_bundle, tmp_path):
    copy = copy_of(runtime_bundle, tmp_path)
    pinned = sorted(Manifest.load(copy, verify="never").all_files())
    wait_past_racy_window()
    first = Manifest.load(copy).verification
    assert first.hashed == pinned and first.trusted == [] and first.stamp == copy / STAMP
    second = Manifest.load(copy).verification
    assert second.hashed == [] and second.trusted == pinned and second.stamp is None
    touched = graph_rel(copy, "dape")
    os.utime(copy / touched, ns=(time.time_ns(), time.time_ns() - 5 * 10**9))
    third = Manifest.load(copy).verification
    assert third.hashed == [touched] and len(third.trusted) == len(pinned) - 1


def test_rewritten_file_with_restored_size_and_mtime_is_still_hashed(runtime_bundle, tmp_path):
    """The stamp's contract: a file is trusted only while size, mtime, ctime and inode are those it had
    when it was hashed. ctime cannot be set back, so restoring the mtime does not hide a change."""
    copy = copy_of(runtime_bundle, tmp_path)
    wait_past_racy_window()
    Manifest.load(copy)
    rel = graph_rel(copy, "controlnet")
    flip_byte(copy / rel, keep_mtime=True)
    refused(lambda: Manifest.load(copy), copy, rel, "sha256")


def test_changed_sha256_in_the_manifest_is_checked_again(runtime_bundle, tmp_path):
    copy = copy_of(runtime_bundle, tmp_path)
    wait_past_racy_window()
    Manifest.load(copy)
    edit_manifest(copy, lambda d: d["files"].update({"tokenizer.json": "0" * 64}))
    refused(lambda: Manifest.load(copy), copy, "tokenizer.json", "0" * 64)


def test_verify_always_rehashes_and_never_skips(runtime_bundle, tmp_path):
    copy = copy_of(runtime_bundle, tmp_path)
    pinned = sorted(Manifest.load(copy, verify="never").all_files())
    wait_past_racy_window()
    Manifest.load(copy)
    assert Manifest.load(copy, verify=True).verification.hashed == pinned
    assert Manifest.load(copy, verify="always").verification.hashed == pinned
    rel = "negative_prompt_embeds.npy"  # still loadable after the flip: the pipeline runs on it
    flip_byte(copy / rel)
    assert Manifest.load(copy, verify="never").verification is None
    pipe = SeeSRPipeline.from_bundle(copy, verify=False)
    assert pipe.text.negative_embeds.shape[0] == 1
    refused(lambda: SeeSRPipeline.from_bundle(copy, verify=True), rel)


def test_unknown_verify_value_is_an_option_error(runtime_bundle):
    with pytest.raises(OptionError, match=r"verify='sometimes': expected 'auto'"):
        Manifest.load(runtime_bundle, verify="sometimes")


def _load_without_write_access(bundle: Path) -> dict:
    """Manifest.load(bundle) by a user who may read the bundle but not write into it. As root (who writes
    anywhere), in a child process that has dropped to the 'nobody' user."""

    def load() -> dict:
        verification = Manifest.load(bundle).verification
        return {
            "stamp": str(verification.stamp),
            "hashed": len(verification.hashed),
            "trusted": len(verification.trusted),
        }

    if os.geteuid() != 0:
        return load()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report through the pipe, never return into pytest
        os.close(reader)
        try:
            os.setgid(65534)
            os.setuid(65534)
            result = load()
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which fails the test
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(writer, json.dumps(result).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as f:
        result = json.loads(f.read() or "{}")
    os.waitpid(child, 0)
    assert "error" not in result, result["error"]
    return result


def test_read_only_bundle_is_stamped_in_the_user_cache(runtime_bundle, monkeypatch):
    # A world-traversable folder: as root the load runs as 'nobody' (pytest's tmp_path is private).
    folder = Path(tempfile.mkdtemp(prefix="seesr-readonly-"))
    try:
        folder.chmod(0o755)
        copy = copy_of(runtime_bundle, folder)
        (copy / STAMP).unlink(missing_ok=True)  # the build's stamp, copied along: shows no stamp is written here
        cache = folder / "cache"
        cache.mkdir()
        cache.chmod(0o777)
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        pinned = len(Manifest.load(copy, verify="never").all_files())
        wait_past_racy_window()
        expected = stamp_locations(copy)[1]
        assert expected.is_relative_to(cache / "seesr" / "verified")
        assert _load_without_write_access(copy) == {"stamp": str(expected), "hashed": pinned, "trusted": 0}
        assert not (copy / STAMP).exists()
        assert _load_without_write_access(copy) == {"stamp": "None", "hashed": 0, "trusted": pinned}
    finally:
        for path in folder.rglob("*"):
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        shutil.rmtree(folder)


# ---------------------------------------------------------------- permissions follow the umask


@pytest.fixture
def umask():
    """Sets the umask (the test's value) and puts the previous one back afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_atomically_gives_the_umask_mode(tmp_path, umask, mask, file_mode):
    umask(mask)
    target = tmp_path / "out" / "sample.png"
    write_atomically(target, lambda tmp: Path(tmp).write_bytes(b"\x89PNG"))
    assert mode(target) == file_mode and target.read_bytes() == b"\x89PNG"


@pytest.mark.parametrize("mask, dir_mode", [(0o022, 0o755), (0o077, 0o700)])
def test_swapped_directory_gets_the_umask_mode(tmp_path, umask, mask, dir_mode):
    umask(mask)
    work = Path(tempfile.mkdtemp(prefix=".out.partial-", dir=tmp_path))
    (work / "file").write_text("x")
    swap_into_place(work, tmp_path / "out")
    assert mode(tmp_path / "out") == dir_mode


def test_built_bundle_is_readable_by_others_under_umask_022(external_data_bundle):
    """Built under umask 022 (the fixture): the top folder was tempfile's 0700 and onnx writes external
    data 0600; every folder must be 0755 and every file 0644."""
    entries = [external_data_bundle, *external_data_bundle.rglob("*")]
    assert any(p.name.endswith(".onnx.data") for p in entries)
    wrong = {str(p): oct(mode(p)) for p in entries if mode(p) != (0o755 if p.is_dir() else 0o644)}
    assert wrong == {}


# ---------------------------------------------------------------- the CLI


def test_upscale_refuses_a_damaged_bundle_and_no_verify_skips_the_check(
    runtime_bundle, tmp_path, lr_image, capsys, umask
):
    copy = copy_of(runtime_bundle, tmp_path)
    flip_byte(copy / "negative_prompt_embeds.npy")
    lr_image.save(tmp_path / "lr.png")
    args = [
        "upscale",
        str(tmp_path / "lr.png"),
        "-o",
        str(tmp_path / "out"),
        "--bundle",
        str(copy),
        "--backend",
        "onnxruntime",
        "--precision",
        "fp32",
        "--steps",
        "2",
        "-q",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and "negative_prompt_embeds.npy" in err and "sha256" in err
    assert not (tmp_path / "out" / "lr.png").exists()
    umask(0o022)
    assert main(args + ["--no-verify"]) == 0
    assert mode(tmp_path / "out" / "lr.png") == 0o644


def test_bench_takes_no_verify():
    assert build_parser().parse_args(["bench", "--bundle", "b", "--no-verify"]).no_verify is True
    assert build_parser().parse_args(["bench", "--bundle", "b"]).no_verify is False
