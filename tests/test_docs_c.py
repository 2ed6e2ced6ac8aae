"""The C and C++ the documents and the native headers show compiles (a syntax and type check against
runtime/cpp/include; no library needed): ```c and ```cpp blocks, and the examples in the leading comments of
seesr.h and seesr.hpp. `make test-cpp` runs this file beside the native runtime's tests. The conventions (what a
block may assume) are in doc_blocks.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from doc_blocks import HEADERS, ROOT, Block, all_blocks, header_examples

INCLUDE = ROOT / "runtime" / "cpp" / "include"
COMPILERS = {
    # seesr.h promises C99 (and CMake builds the C example as C99); a call through a wrong pointer type or an
    # undeclared function is an error, not a warning.
    "c": (
        "cc",
        [
            "-x",
            "c",
            "-std=c99",
            "-pedantic-errors",
            "-Werror=implicit-function-declaration",
            "-Werror=incompatible-pointer-types",
            "-Werror=int-conversion",
        ],
    ),
    "cpp": ("c++", ["-x", "c++", "-std=c++17", "-pedantic-errors"]),
}
PRELUDES = {
    "c": '#include <stdint.h>\n#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include "seesr.h"\n',
    "cpp": "#include <cstdint>\n#include <cstdio>\n#include <iostream>\n#include <string>\n#include <vector>\n"
    '#include "seesr.hpp"\n',
}
SIGNATURE = {
    "c": "int snippet(const uint8_t *rgb, int32_t width, int32_t height, int32_t stride)",
    "cpp": "int snippet(const std::uint8_t *rgb, int width, int height, int stride)",
}
LANGUAGES = {"c": "c", "cpp": "cpp", "c++": "cpp"}


def translation_unit(block: Block) -> str:
    """The file a block compiles as: a whole file as it is, else the body of ``snippet`` (doc_blocks.py);
    ``#line`` makes the compiler's messages name the document and its line."""
    language = LANGUAGES[block.language]
    located = f'#line {block.line} "{block.path}"\n{block.text}'
    if re.search(r"^\s*#\s*include|\bmain\s*\(", block.text, re.MULTILINE):
        return located
    return f"{PRELUDES[language]}{SIGNATURE[language]} {{\n{located}\nreturn 0;\n}}\n"


def compile_errors(block: Block) -> str | None:
    """None if the block compiles; else the compiler's messages."""
    compiler, flags = COMPILERS[LANGUAGES[block.language]]
    done = subprocess.run(
        [compiler, *flags, "-fsyntax-only", "-I", str(INCLUDE), "-"],
        input=translation_unit(block),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return None if done.returncode == 0 else done.stderr


@pytest.fixture(autouse=True, scope="module")
def compilers():
    missing = [compiler for compiler, _ in COMPILERS.values() if shutil.which(compiler) is None]
    if missing:
        pytest.skip(f"compiling the documents' C and C++ needs {' and '.join(missing)} (apt-get install g++)")


SNIPPETS = all_blocks(tuple(LANGUAGES)) + [example for header in HEADERS for example in header_examples(Path(header))]


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda block: block.where)
def test_snippet_compiles(block):
    problem = compile_errors(block)
    if problem is not None:
        pytest.fail(f"{block.where}: does not compile:\n{problem[-3000:]}", pytrace=False)


def test_both_headers_show_an_example():
    shown = {str(block.path) for block in SNIPPETS}
    assert set(HEADERS) <= shown, f"no example found in the leading comment of {set(HEADERS) - shown}"


def test_the_old_seesr_hpp_example_does_not_compile():
    """seesr.hpp's example once passed `options` where Pipeline::upscale takes `const Options *`."""
    (example,) = header_examples(Path("runtime/cpp/include/seesr.hpp"))
    assert "stride, &options)" in example.text
    old = Block(example.path, example.line, example.language, (), example.text.replace("&options)", "options)"))
    problem = compile_errors(old)
    assert problem is not None and f"{example.path}:{example.line + 3}" in problem and "upscale" in problem


def test_a_c_call_through_the_wrong_pointer_does_not_compile():
    (example,) = header_examples(Path("runtime/cpp/include/seesr.h"))
    assert "options, &out);" in example.text
    wrong = Block(
        example.path, example.line, example.language, (), example.text.replace("options, &out);", "options, out);")
    )
    problem = compile_errors(wrong)
    assert problem is not None and "seesr_upscale" in problem
