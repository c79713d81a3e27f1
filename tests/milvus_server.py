"""A real Milvus Lite gRPC server for tests: ``milvus-lite server`` in a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

STARTUP_SECONDS = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def milvus_lite_command() -> list[str] | None:
    """The ``milvus-lite`` command of this interpreter's environment, or ``None`` where the package is missing."""
    try:
        import milvus_lite  # noqa: F401
    except ImportError:
        return None
    script = Path(sys.executable).with_name("milvus-lite")
    if script.exists():
        return [str(script)]
    found = shutil.which("milvus-lite")
    return [found] if found else [sys.executable, "-m", "milvus_lite"]


@contextlib.contextmanager
def milvus_lite_server(data_dir: Path) -> Iterator[str]:
    """Run ``milvus-lite server`` on a free port of 127.0.0.1 until the block ends; yields ``HOST:PORT``.

    Ready once a ``MilvusClient`` gets the server's version; the process is killed at the end (and if
    it never gets ready, with its log in the error).
    """
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    command = milvus_lite_command()
    assert command is not None, "milvus_lite is not installed"
    port = free_port()
    log = data_dir.with_name(data_dir.name + ".log")
    with log.open("wb") as out:
        process = subprocess.Popen([*command, "server", "--host", "127.0.0.1", "--port", str(port),
                                    "--data-dir", str(data_dir), "--max-workers", "4"],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                client = MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=1)
                client.get_server_version(timeout=1)
                client.close()
                break
            except MilvusException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"milvus-lite server not ready after {STARTUP_SECONDS:g} s: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
