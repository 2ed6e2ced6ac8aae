"""A real ``tritonserver`` for tests: the binary shipped in the nvidia-pytriton wheel, run directly on a
model repository, bound to 127.0.0.1 only, started and stopped within bounded times.

The wheel keeps one Python-backend stub per Python version; the backend directory given to the
server gets the stub matching the interpreter running the tests, whose environment (seesr_runtime,
numpy<2) the stub then uses. The stub links libpython dynamically, hence LIBDIR on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"


def pytriton_dist() -> Path | None:
    """The tritonserver distribution inside the installed nvidia-pytriton wheel, if any."""
    try:
        import pytriton
    except ImportError:
        return None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class TritonServer:
    """``with TritonServer(repo, workdir) as server: server.http_url, server.grpc_url``."""

    def __init__(
        self,
        repository: Path,
        workdir: Path,
        start_timeout: float = 120,
        stop_timeout: float = 30,
        extra_args: tuple[str, ...] = (),
        launcher: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        """``launcher``: a command that starts tritonserver (found on PATH) on the repository named in
        $SEESR_MODEL_REPOSITORY, given the other options (the deployment's ``seesr_runtime.triton.serve``);
        ``env``: variables added to the server's environment."""
        self.repository, self.workdir, self.extra_args = repository, workdir, extra_args
        self.launcher, self.extra_env = launcher, env or {}
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http_url, self.grpc_url = f"{LOOPBACK}:{self.http_port}", f"{LOOPBACK}:{self.grpc_port}"
        self.log_path = workdir / "tritonserver.log"
        # The Python backend's shared-memory regions (/dev/shm) get this server's own prefix: a stub that dies
        # leaves its region behind, and stop() removes exactly this server's.
        self.shm_prefix = f"seesr_test_triton_{os.getpid()}_{self.http_port}_"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def __enter__(self) -> TritonServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        dist = pytriton_dist()
        if dist is None:
            raise RuntimeError("nvidia-pytriton (with its tritonserver binary) is not installed in this interpreter")
        if self.launcher:
            start = [*self.launcher]
        else:
            start = [str(dist / "bin" / "tritonserver"), f"--model-repository={self.repository}"]
        command = [
            *start,
            f"--backend-directory={self._backends(dist)}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]
        began = time.monotonic()
        with open(self.log_path, "wb") as log:
            # Own session: stop() can signal the server and its stub processes as one group.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self._env(dist), start_new_session=True
            )
        self._wait_ready(began)
        self.startup_seconds = time.monotonic() - began

    def _backends(self, dist: Path) -> Path:
        backends = self.workdir / "backends"
        shutil.copytree(dist / "backends", backends, dirs_exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise RuntimeError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def _env(self, dist: Path) -> dict:
        env = dict(os.environ)
        libs = [str(dist.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = f"{Path(sys.executable).parent}:{dist / 'bin'}:{env['PATH']}"  # the stub's python is ours
        env["SEESR_MODEL_REPOSITORY"] = str(self.repository)  # for a launcher
        env.update(self.extra_env)
        # glibc's mmap threshold, fixed at 1 MiB for the server and its stubs: a freed buffer of that size or more
        # goes back to the system, so resident memory tracks live memory (the soak's leak check). Left dynamic,
        # the threshold rises with the buffers freed and the heap keeps them: 60 to 80 MiB that come and go.
        env["MALLOC_MMAP_THRESHOLD_"] = env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 20)
        return env

    def _wait_ready(self, began: float) -> None:
        ready = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() - began < self.start_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(ready, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            group = os.getpgid(self.process.pid)
            os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait(timeout=10)
            finally:
                _kill_leftovers(group)
        for region in self.shm_regions():
            region.unlink(missing_ok=True)

    def shm_regions(self) -> list[Path]:
        return sorted(Path("/dev/shm").glob(f"{self.shm_prefix}*"))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def resident_bytes(self) -> int:
        """Resident memory of the server and its Python-backend stubs (its child processes), summed."""
        return sum(_resident_bytes(pid) for pid in _process_tree(self.process.pid))


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc (no psutil)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def _resident_bytes(pid: int) -> int:
    """VmRSS of one process; 0 for one that ended or is a zombie (which has no VmRSS line)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _kill_leftovers(group: int) -> None:
    """Stub processes outlive a killed server; they are in its process group (ours alone)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
