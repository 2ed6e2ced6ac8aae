"""The deployment's server command: ``python -m seesr_runtime.triton.serve [TRITONSERVER OPTIONS...]``.

It replaces itself with ``tritonserver`` on the model repository ``$SEESR_MODEL_REPOSITORY`` (default
``/models``, where deploy/triton/Dockerfile generates it), admitting to inference only the requests that carry
the access key of ``$SEESR_TRITON_KEY`` (``server_access_arguments``). The key comes from the container's
environment at run time, never from the image; without one it refuses to start. Options after the command go
to tritonserver (e.g. ``--log-verbose=1``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from ..errors import InputError
from . import ACCESS_KEY_ENV, server_access_arguments

REPOSITORY_ENV = "SEESR_MODEL_REPOSITORY"
DEFAULT_REPOSITORY = "/models"
SERVER = "tritonserver"  # found on PATH, as in NVIDIA's image (/opt/tritonserver/bin)


def server_command(environ: Mapping[str, str], extra: Sequence[str]) -> list[str]:
    """tritonserver's command line for this environment; an ``InputError`` when it holds no usable key."""
    key = environ.get(ACCESS_KEY_ENV, "")
    if not key:
        raise InputError(
            f"${ACCESS_KEY_ENV} is not set: the server admits only requests carrying its access key; make one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(24))' and give it to the clients too"
        )
    repository = environ.get(REPOSITORY_ENV, DEFAULT_REPOSITORY)
    return [SERVER, f"--model-repository={repository}", *server_access_arguments(key), *extra]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        command = server_command(os.environ, sys.argv[1:] if argv is None else argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvp(command[0], command)  # the server takes this process's place: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
