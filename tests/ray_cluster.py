"""A real two-node Ray cluster on this machine, inside a network namespace of its own (tests/test_ray.py,
benchmarks/ray_scale.py).

Ray advertises the machine's interface address even when told 127.0.0.1, so the cluster and every client
run in a namespace made with ``unshare -n`` whose only interface is ``lo``: there Ray's one address is
127.0.0.1 and no test traffic leaves the machine. A process holds the namespace (``sleep``); commands join it
with ``nsenter --net``. Each node is a ``ray start --block`` child: stopping it stops that node's processes,
so the cluster is torn down without ``ray stop`` (which would stop every Ray process on the machine).
Needs root (or CAP_SYS_ADMIN) for the namespace; ``namespace_unavailable`` says why it cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT = 6379
ADDRESS = f"127.0.0.1:{PORT}"
OBJECT_STORE_BYTES = 100_000_000  # Ray's smallest useful store; the rows it carries are tiny
# Prints {node id: the node's custom resources} once both nodes are alive (the cluster's readiness check).
PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
wanted = int(sys.argv[2])
deadline = time.monotonic() + 120
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= wanted or time.monotonic() > deadline:
        break
    time.sleep(0.2)
standard = {"CPU", "GPU", "memory", "object_store_memory"}
print(json.dumps({n["NodeID"]: sorted(k for k in n["Resources"] if k not in standard and not k.startswith("node:"))
                  for n in nodes}))
"""


def namespace_unavailable() -> str | None:
    """Why a network namespace cannot be made here (no unshare/nsenter/ip, or not permitted), or None."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux, iproute2)"
    tried = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if tried.returncode != 0:
        return f"unshare -n is not permitted here (needs root or CAP_SYS_ADMIN): {tried.stderr.strip()}"
    return None


def environment() -> dict[str, str]:
    """The environment of the nodes and clients: this checkout's code first on the path (the workers
    import the runtime from it), no usage reports."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "runtime"), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


class Cluster:
    """``Cluster(node_cpus=(1, 1)).start()``: a head and one worker node, the worker with the custom resource
    ``second_node`` and the head ``head_node``; ``nodes`` maps node ids to those names. ``command(argv)``
    makes any command line run inside the namespace."""

    def __init__(self, node_cpus: tuple[int, int] = (1, 1)):
        self.node_cpus = node_cpus
        self.env = environment()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="seesr-ray-"))  # short: Ray's socket paths must fit
        self.holder: subprocess.Popen[str] | None = None
        self.node_processes: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[str, str] = {}  # node id -> "head_node" / "second_node"

    def command(self, argv: list[str]) -> list[str]:
        assert self.holder is not None, "start() the cluster first"
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *argv]

    def start(self) -> Cluster:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline().strip() == "up"
        try:
            self._start_node("head", ["--head", f"--port={PORT}", f"--temp-dir={self.temp_dir}"], self.node_cpus[0])
            self._start_node("second", [f"--address={ADDRESS}"], self.node_cpus[1])
            probe = subprocess.run(
                self.command([sys.executable, "-c", PROBE, ADDRESS, "2"]),
                env=self.env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert probe.returncode == 0, probe.stderr[-3000:]
            found = json.loads(probe.stdout.strip().splitlines()[-1])
            self.nodes = {node: resources[0] for node, resources in found.items() if resources}
            assert sorted(self.nodes.values()) == ["head_node", "second_node"], (found, self.log_tail())
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, name: str, flags: list[str], cpus: int) -> None:
        log = open(self.temp_dir / f"{name}.log", "wb")
        argv = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--block",
            *flags,
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({f'{name}_node': 1})}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        if name != "head":
            argv.remove("--include-dashboard=false")  # a head-node flag
        # its own process group: the node's processes (GCS, raylet, workers) stay in it, so stop() can end
        # them all at once
        process = subprocess.Popen(
            self.command(argv), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.node_processes.append(process)
        deadline = time.monotonic() + 180
        while b"Ray runtime started" not in (self.temp_dir / f"{name}.log").read_bytes():
            assert process.poll() is None, f"ray start ({name}) exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"ray start ({name}) did not start:\n{self.log_tail()}"
            time.sleep(0.2)

    def log_tail(self) -> str:
        return "\n".join(
            f"== {log.name}\n" + log.read_text(errors="replace")[-2000:] for log in sorted(self.temp_dir.glob("*.log"))
        )

    def stop(self) -> None:
        """Each node's ``ray start --block`` asked to stop (it stops the node's processes); whatever of its
        session is left after a few seconds (workers that outlive their raylet) killed; then the namespace."""
        sessions = {process.pid for process in self.node_processes}  # each node leads a session of its own
        for process in self.node_processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3  # a test cluster: nothing in it needs a graceful end
        for process in self.node_processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in processes_in_sessions(sessions):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.node_processes:
            process.wait()
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def processes_in_sessions(sessions: set[int]) -> list[int]:
    """The processes whose session id is one of ``sessions`` (field 6 of /proc/PID/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[3]) in sessions:
            found.append(int(stat.parent.name))
    return found
