"""The documents hold true: every ``seesr``, ``seesr-export`` and ``seesr-triton-client`` command line they show
is taken by that program's real argument parser, and the Python blocks of the README and docs/usage.md run
against the tiny bundle. (The C and C++ blocks compile: test_docs_c.py.) The conventions a writer needs are in
doc_blocks.py."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from doc_blocks import PROGRAMS, ROOT, SHELL_LANGUAGES, Block, all_blocks, logical_lines, markdown_blocks
from PIL import Image

from seesr_export import cli as export_cli
from seesr_runtime import cli as runtime_cli
from seesr_runtime import triton_client

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "seesr": runtime_cli.build_parser,
    "seesr-export": export_cli.build_parser,
    "seesr-triton-client": triton_client.build_parser,
}
assert set(PARSERS) == set(PROGRAMS)
# Shell operators that end a command; tokens that begin a redirection ("<placeholder>" is a value, "<" is not).
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTION = re.compile(r"^(\d*>|&>|<$)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SAMPLE = ROOT / "seesr_export" / "assets" / "sample.png"
PYTHON_DOCUMENTS = (Path("README.md"), Path("docs/usage.md"))


# ---------------------------------------------------------------- command lines


def commands(line: str) -> list[list[str]]:
    """The argv of each command on a shell line whose program is one of PROGRAMS (program name first)."""
    found, segment, redirected = [], [], False
    for token in [*shlex.split(line, comments=True), ";"]:
        if token in SEPARATORS:
            while segment and ASSIGNMENT.match(segment[0]):
                segment.pop(0)
            if segment and os.path.basename(segment[0]) in PROGRAMS:
                found.append([os.path.basename(segment[0]), *segment[1:]])
            segment, redirected = [], False
        elif REDIRECTION.match(token):
            redirected = True  # the rest of this command is a redirection's
        elif not redirected:
            segment.append(token)
    return found


def is_placeholder(value: object) -> bool:
    """A value a document leaves to the reader: a shell variable or substitution, or ``<something>``."""
    return isinstance(value, str) and ("$" in value or (value.startswith("<") and value.endswith(">")))


class _Choices(list):
    def __contains__(self, value: object) -> bool:
        return is_placeholder(value) or super().__contains__(value)


class ParseError(Exception):
    pass


def _strict(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and its subcommands raise ParseError instead of exiting, and take placeholders as values."""

    def error(message: str, prog: str = parser.prog) -> None:
        raise ParseError(f"{prog}: {message}")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _strict(subparser)
            continue
        if callable(action.type):
            action.type = _or_placeholder(action.type)
        if action.choices is not None:
            action.choices = _Choices(action.choices)


def _or_placeholder(convert: Callable[[str], object]) -> Callable[[str], object]:
    @functools.wraps(convert)  # argparse names the type in its message ("invalid int value")
    def converted(value: str) -> object:
        return value if is_placeholder(value) else convert(value)

    return converted


def check_command(argv: list[str]) -> str | None:
    """None if the program's own parser takes ``argv`` (program name first); else its error."""
    parser = PARSERS[argv[0]]()
    _strict(parser)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(argv[1:])
    except ParseError as exc:
        return str(exc)
    except SystemExit as exc:  # --help, --version
        return None if exc.code == 0 else f"{argv[0]} exited with {exc.code}"
    return None


def command_failures(blocks: list[Block]) -> tuple[int, list[str]]:
    """How many command lines ``blocks`` hold, and a "file:line: command: error" for each the parser refuses."""
    count, failures = 0, []
    for block in blocks:
        for number, line in logical_lines(block):
            try:
                found = commands(line)
            except ValueError as exc:  # unbalanced quotes
                if any(re.search(rf"(^|[\s/]){re.escape(p)}\s", line) for p in PROGRAMS):
                    failures.append(f"{block.path}:{number}: {line.strip()}: cannot be split into words ({exc})")
                continue
            for argv in found:
                count += 1
                problem = check_command(argv)
                if problem is not None:
                    failures.append(f"{block.path}:{number}: {shlex.join(argv)}: {problem}")
    return count, failures


SHELL_BLOCKS = all_blocks(SHELL_LANGUAGES)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda block: block.where)
def test_command_lines_parse(block):
    _, failures = command_failures([block])
    assert not failures, "\n".join(failures)


def test_the_documents_show_command_lines():
    count, _ = command_failures(SHELL_BLOCKS)
    assert count >= 10, f"only {count} command lines found in {sorted({str(b.path) for b in SHELL_BLOCKS})}"


def test_a_misspelt_flag_fails(tmp_path):
    document = tmp_path / "misspelt.md"
    document.write_text(
        "Intro.\n\n```bash\nseesr upscale in.png -o out/ --bundle $BUNDLE \\\n    --stpes 2   # two steps\n```\n"
    )
    count, failures = command_failures(markdown_blocks(document, document.read_text()))
    assert count == 1
    assert failures == [
        f"{document}:4: seesr upscale in.png -o out/ --bundle '$BUNDLE' --stpes 2: "
        "seesr: unrecognized arguments: --stpes 2"
    ]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("seesr upscale in.png -o out/ --bundle engines/seesr --steps 20", None),
        ("SEESR_X=1 seesr bench --bundle <bundle> --size 512 --steps $STEPS > bench.txt", None),
        (".venv/bin/seesr-export build --seesr-root /path/to/SeeSR --out e --precision fp16  # fp16", None),
        ("seesr --help && seesr-triton-client load a.png --requests 8", None),
        ("seesr upscael in.png", "seesr: argument command: invalid choice: 'upscael'"),
        ("seesr bench --bundle b --steps two", "seesr bench: argument --steps: invalid int value: 'two'"),
        ("seesr-export build --out e --precision fp8", "argument --precision: invalid choice: 'fp8'"),
        ("seesr-triton-client upscale a.png", "the following arguments are required: -o/--output"),
    ],
)
def test_the_checker_reads_shell_lines_as_the_shell_does(line, problem):
    problems = [check_command(argv) for argv in commands(line)]
    assert problems and all(p is None for p in problems) if problem is None else problem in (problems[0] or "")


# ---------------------------------------------------------------- Python blocks


def python_blocks() -> list[Block]:
    return [
        block
        for path in PYTHON_DOCUMENTS
        if (ROOT / path).is_file()
        for block in markdown_blocks(path)
        if block.language == "python"
    ]


# The defaults of the bundle the Python blocks get: the tiny bundle's networks at these settings run a block in
# seconds (its own defaults, the official 50 steps at 512 px, take minutes on two cores).
FAST_DEFAULTS = {"steps": 2, "process_size": 64}


@pytest.fixture(scope="module")
def doc_folder(runtime_bundle, tmp_path_factory):
    """What the Python blocks may assume in their working directory: engines/seesr, a copy of the tiny bundle
    whose defaults are FAST_DEFAULTS, and photo.png, a small RGB photo."""
    folder = tmp_path_factory.mktemp("docs")
    bundle = folder / "engines" / "seesr"
    shutil.copytree(runtime_bundle, bundle, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".seesr-*"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["pipeline"]["defaults"].update(FAST_DEFAULTS)
    for option in manifest["pipeline"].get("options", []):
        option["default"] = FAST_DEFAULTS.get(option["name"], option["default"])
    (bundle / "manifest.json").unlink()  # a link to the original's: replaced, not written through
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with Image.open(SAMPLE) as sample:
        sample.convert("RGB").resize((48, 40), Image.Resampling.BICUBIC).save(folder / "photo.png")
    (folder / "home").mkdir()
    return folder


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def run_python_block(block: Block, folder: Path, scratch: Path) -> str | None:
    """Run a Python block in a fresh interpreter with ``folder`` (doc_folder) as its working directory and
    its HOME; None if it succeeds, else its stderr's end."""
    # Run as a file named like the document, its lines where they stand there: tracebacks point into it.
    script = scratch / block.path.name
    script.write_text("\n" * (block.line - 1) + block.text)
    env = {**os.environ, "HOME": str(folder / "home"), "XDG_CACHE_HOME": str(folder / "home" / ".cache")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    return None if done.returncode == 0 else done.stderr[-3000:]


@pytest.mark.parametrize("block", python_blocks(), ids=lambda block: block.where)
def test_python_block_runs(block, doc_folder, tmp_path):
    if "no-run" in block.flags:
        pytest.skip(f"{block.where}: fenced ```python no-run")
    problem = run_python_block(block, doc_folder, tmp_path)
    if problem is not None:
        pytest.fail(f"{block.where}: the block failed:\n{problem}", pytrace=False)


def test_the_python_runner_tells_a_working_block_from_a_broken_one(doc_folder, tmp_path):
    document = tmp_path / "example.md"
    document.write_text(
        "```python\n"
        "from PIL import Image\n"
        "from seesr_runtime import SeeSRPipeline\n\n"
        'pipe = SeeSRPipeline.from_bundle("engines/seesr")\n'
        'result = pipe(Image.open("photo.png"), seed=0)\n'
        'result.image.save("photo_x4.png")\n'
        "assert result.image.size == (192, 160), result.image.size\n"
        "```\n\n"
        "```python no-run\nresult = pipe(image)\n```\n"
    )
    working, shown = markdown_blocks(document, document.read_text())
    assert shown.flags == ("no-run",)
    assert run_python_block(working, doc_folder, tmp_path) is None
    assert (doc_folder / "photo_x4.png").is_file()
    problem = run_python_block(shown, doc_folder, tmp_path)
    assert f'example.md", line {shown.line}' in problem and "NameError: name 'pipe' is not defined" in problem
