"""Local network helpers shared by the launcher, the gateway, measurement and the tests: free TCP ports and
an HTTP opener that never goes through a proxy (our servers listen on this machine; `http_proxy` would send
a request for 127.0.0.1 to a proxy that cannot reach it).

    http, grpc, metrics = free_ports(3)
    with DIRECT.open("http://127.0.0.1:8002/metrics", timeout=2) as response: ...
"""

from __future__ import annotations

import socket
import urllib.request

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # urllib opener without any proxy


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (a port in TIME_WAIT counts as free, as it does for Triton)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; another process may take it before you do)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports, e.g. `http, grpc, metrics = free_ports(3)`."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
