"""deploy/triton: its Dockerfile agrees with the code it runs, and the build context holds what it needs alone.

The image itself is not built here: its base (nvcr.io) is out of reach, and this machine's podman cannot run a
container or a RUN step (crun may not set RLIMIT_NOFILE/NPROC in this sandbox; deploy/triton/README.md). What is
checked instead: the generator's command line of the Dockerfile, with its build arguments' defaults, is one
``seesr-export triton`` takes and writes a repository with (run for real on the tiny bundle); the entry point is
the runtime's server command and reads the repository the Dockerfile writes; the extras it installs exist; and,
where podman is installed, a real build of the Dockerfile's COPY steps over the repository's root shows what the
.dockerignore lets into the build context.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from seesr_runtime.triton import serve

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "triton" / "Dockerfile"
# What the image needs of the repository, as the Dockerfile's COPY lines name it.
PACKAGE_SOURCES = {"pyproject.toml", "README.md", "LICENSE", "runtime", "seesr_export"}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (keyword, arguments), continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def build_arguments() -> dict[str, str]:
    """ARG NAME=DEFAULT, the defaults unquoted as a shell would."""
    return {
        name: " ".join(shlex.split(default))
        for keyword, rest in instructions()
        if keyword == "ARG" and "=" in rest
        for name, default in [rest.split("=", 1)]
    }


def expand(text: str) -> str:
    arguments = build_arguments()
    return re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], text)


def generator_command() -> list[str]:
    """The RUN step's ``seesr-export triton ...``, its build arguments at their defaults, split as the shell does."""
    runs = [rest for keyword, rest in instructions() if keyword == "RUN" and "seesr-export triton" in rest]
    assert len(runs) == 1, runs
    words = shlex.split(expand(runs[0]))
    assert words[0].startswith("--mount=type=bind,from=bundle,target=")
    return words[1:]


def test_the_generator_command_of_the_image_writes_a_repository(runtime_bundle, tmp_path):
    from seesr_export.cli import main

    command = generator_command()
    assert command[:2] == ["seesr-export", "triton"]
    mount = shlex.split(expand(next(r for k, r in instructions() if k == "RUN" and "seesr-export" in r)))[0]
    arguments = command[2:]
    # The bundle is the build step's mount; the output, the repository the entry point serves.
    assert arguments[arguments.index("--bundle") + 1] == mount.rsplit("target=", 1)[1]
    out = arguments[arguments.index("--out") + 1]
    environment = dict(rest.split("=", 1) for keyword, rest in instructions() if keyword == "ENV")
    assert environment[serve.REPOSITORY_ENV] == out == serve.DEFAULT_REPOSITORY

    here = [*arguments]
    here[here.index("--bundle") + 1] = str(runtime_bundle)
    here[here.index("--out") + 1] = str(tmp_path / "models")
    assert main(["triton", *here, "-q"]) == 0
    config = (tmp_path / "models" / "seesr" / "config.pbtxt").read_text()
    assert 'key: "backend" value: { string_value: "openvino" }' in config
    assert "count: 2 kind: KIND_CPU" in config


def test_the_entry_point_is_the_runtimes_server_command():
    entrypoints = [json.loads(rest) for keyword, rest in instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints == [["python3", "-m", serve.__name__]]


def test_the_extras_the_image_installs_exist():
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([\w-]+) = \[", section, re.MULTILINE)
    assert "openvino" in extras
    assert build_arguments()["SEESR_EXTRAS"] in extras
    install = next(rest for keyword, rest in instructions() if keyword == "RUN" and "pip install" in rest)
    assert "[${SEESR_EXTRAS}]" in install


def test_the_copy_steps_take_only_the_package_sources():
    copies = [shlex.split(rest) for keyword, rest in instructions() if keyword == "COPY"]
    sources = {Path(source).parts[0] for words in copies for source in words[:-1]}
    assert sources == PACKAGE_SOURCES


def _podman_unusable() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman): the build context is checked by a real build"
    return None


@pytest.mark.skipif(_podman_unusable() is not None, reason=_podman_unusable() or "")
def test_the_build_context_holds_the_package_sources_alone(tmp_path):
    """A real podman build over the repository's root, with its .dockerignore: the Dockerfile's COPY steps, plus
    one copying the whole context, on an empty base (no RUN: nothing runs a container here)."""
    copies = [f"COPY {rest}" for keyword, rest in instructions() if keyword == "COPY"]
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text("\n".join(["FROM scratch", "COPY . /context/", *copies]) + "\n")
    tag = f"localhost/seesr-deploy-test-{uuid.uuid4().hex[:12]}"
    archive = tmp_path / "image.tar"
    try:
        subprocess.run(
            ["podman", "build", "-q", "-f", str(containerfile), "-t", tag, str(ROOT)], check=True, timeout=300
        )
        subprocess.run(["podman", "save", "-q", "--format", "docker-archive", "-o", str(archive), tag], check=True)
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, timeout=120)
    files = _image_files(archive)
    context = {name.removeprefix("context/") for name in files if name.startswith("context/")}
    assert {Path(name).parts[0] for name in context} == PACKAGE_SOURCES
    assert not [name for name in context if "__pycache__" in name or name.endswith(".pyc")]
    assert "runtime/seesr_runtime/triton/model.py" in context and "seesr_export/assets/sample.png" in context
    copied = {name.removeprefix("opt/seesr/src/") for name in files if name.startswith("opt/seesr/src/")}
    assert copied == context  # the COPY steps take the whole (ignore-filtered) package


def _image_files(archive: Path) -> set[str]:
    """Regular files of every layer of a docker-archive image."""
    names: set[str] = set()
    with tarfile.open(archive) as image:
        layers = [m for m in image.getmembers() if m.name.endswith("layer.tar") or m.name.endswith(".tar")]
        for layer in layers:
            with tarfile.open(fileobj=image.extractfile(layer)) as files:
                names |= {m.name.removeprefix("./") for m in files.getmembers() if m.isfile()}
    return names
