"""Loopback ports: pick free ones, wait until a server answers."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so the kernel cannot repeat one)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 30, alive=lambda: True) -> None:
    """Wait until ``host:port`` accepts a connection; ``alive()`` False aborts early."""
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if not alive():
            raise RuntimeError(f"process died before {host}:{port} accepted connections")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered on {host}:{port} after {timeout:g} s")
        time.sleep(0.05)
