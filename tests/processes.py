"""Finding the processes a test started, by an environment variable they inherit (Ray's raylets, GCS, workers
and actors all inherit the environment of the process that started them)."""
from __future__ import annotations

import os


def process_environ(pid: str) -> dict[str, str]:
    """The environment a process started with ({} when it is gone or not readable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def process_title(pid: str) -> str:
    """What the process calls itself (Ray workers rename themselves, e.g. ``ray::ServeReplica:...``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes_with(name: str, value: str) -> list[str]:
    """Pids of the live processes whose environment has name=value (this process excluded)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if pid != str(os.getpid()) and process_environ(pid).get(name) == value:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] == "Z":   # a zombie has ended; only its entry is left
                        continue
            except OSError:
                continue
            found.append(pid)
    return found


def tagged(tag: str) -> list[str]:
    """Pids of the processes whose environment carries ``MSDDA_TEST_TAG=tag``: a server or job a test started, and
    everything its Ray started."""
    return processes_with("MSDDA_TEST_TAG", tag)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
