"""A cluster's replicas as `pensieve serve` processes (`pensieve cluster --subprocess`), each on
loopback: its public port (a free one, read from its "serving ... on HOST:PORT" line) and its
internal port (chosen here, so that each can be given the others as --peer before it starts).

The cluster secret and the API keys reach them through the environment
(PENSIEVE_CLUSTER_SECRET) and a key file readable only by this user (--api-keys-file), never on
a command line other users can see.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from serving.auth import API_KEY_ENV, CLUSTER_SECRET_ENV, ApiKeys, ClusterSecret
from serving.cli_options import engine_flags
from serving.router.links import ReplicaAddress

SERVING_LINE = re.compile(r"pensieve: serving .* on (\S+:\d+)")
READY_TIMEOUT_S = 3600.0      # how long a replica may take to be SERVING (its warm-up)
LOOPBACK = "127.0.0.1"


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n ports free right now (the OS's picks; another process could take one before use)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ReplicaProcesses:
    """Starts, waits for and stops the replica processes of a cluster."""

    def __init__(self, model: str, dtype: str, roles: Sequence[str],
                 engine_options: dict[str, Any], secret: ClusterSecret, api_keys: ApiKeys,
                 gpus: int = 0, max_request_bytes: int | None = None):
        self.model, self.dtype, self.roles = model, dtype, list(roles)
        self.engine_options = engine_options
        self.secret, self.api_keys = secret, api_keys
        self.gpus = gpus
        self.max_request_bytes = max_request_bytes
        self.processes: list[subprocess.Popen] = []
        self._keys_file: str | None = None

    def _command(self, role: str, internal_port: int, peers: list[str]) -> list[str]:
        cmd = [sys.executable, "-m", "serving", "serve", "--model", self.model, "--dtype",
               self.dtype, "--host", LOOPBACK, "--port", "0", "--role", role,
               "--internal-host", LOOPBACK, "--internal-port", str(internal_port)]
        for peer in peers:
            cmd += ["--peer", peer]
        if self._keys_file is not None:
            cmd += ["--api-keys-file", self._keys_file]
        if self.max_request_bytes is not None:
            cmd += ["--max-request-bytes", str(self.max_request_bytes)]
        return cmd + engine_flags(self.engine_options)

    def _environment(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}   # keys: the file only
        env[CLUSTER_SECRET_ENV] = self.secret.value
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % self.gpus)
        return env

    def _write_keys(self) -> None:
        if not self.api_keys.enabled:
            return
        fd, self._keys_file = tempfile.mkstemp(prefix="pensieve-keys-")   # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{key}\n" for key in self.api_keys.keys))

    def spawn(self) -> list[ReplicaAddress]:
        """Start every replica (the first warm before the others start: they then load its
        programs from the persistent compile cache); their addresses once all are SERVING."""
        self._write_keys()
        internal = [f"{LOOPBACK}:{p}" for p in free_ports(len(self.roles))]
        addresses = []
        for i, role in enumerate(self.roles):
            proc = subprocess.Popen(self._command(role, int(internal[i].rpartition(":")[2]),
                                                  internal),
                                    stdout=subprocess.PIPE, stderr=None, text=True,
                                    env=self._environment(i))
            self.processes.append(proc)
            for line in proc.stdout:
                m = SERVING_LINE.search(line)
                if m:
                    addresses.append(ReplicaAddress(m.group(1), internal[i]))
                    break
            else:
                raise RuntimeError(f"replica {i} exited before serving (exit {proc.wait()})")
            if i == 0:
                self.wait_serving([a.target for a in addresses])
        self.wait_serving([a.target for a in addresses])
        return addresses

    def wait_serving(self, targets: list[str]) -> None:
        """Block until these replica processes report gRPC health SERVING (they warmed up)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from serving.router import SERVICE_NAME
        deadline = time.monotonic() + READY_TIMEOUT_S
        for i, (proc, target) in enumerate(zip(self.processes, targets)):
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"replica {i} ({target}) exited before it was "
                                           f"SERVING (exit {proc.returncode})")
                    try:
                        if health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                        timeout=2).status == \
                                health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"replica {i} ({target}) was not SERVING after "
                                           f"{READY_TIMEOUT_S:.0f} s")
                    time.sleep(0.1)

    def stop(self, index: int) -> None:
        """Stop replica `index` (SIGTERM) and wait for it."""
        proc = self.processes[index]
        if proc.poll() is None:
            proc.terminate()
        proc.wait()

    def stop_all(self) -> None:
        for i in range(len(self.processes)):
            self.stop(i)
        if self._keys_file is not None:
            os.unlink(self._keys_file)
            self._keys_file = None


__all__ = ["ReplicaProcesses", "free_ports"]
