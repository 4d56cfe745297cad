"""What answers on a port that was given as one of Triton's endpoints, for errors that name the fix: Triton's
HTTP port (GET /v2 answers with its server metadata), another HTTP server (Triton's metrics port answers every GET
with 200; a dyngate gateway), an HTTP/2 server (Triton's gRPC port), or nothing. The probes connect: they are for
error paths and status checks, never for a request's hot path.

    protocol_mismatch("127.0.0.1:8000", "grpc")  # -> "127.0.0.1:8000 answers HTTP, not gRPC: ..."
    http_endpoint_problem("127.0.0.1:8001")       # -> "127.0.0.1:8001 answers gRPC (HTTP/2): ..."
"""

from __future__ import annotations

import json
import socket
import urllib.error

from dyngate_serving.net import DIRECT

DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002}  # Triton's own defaults


def protocol_mismatch(address: str, protocol: str, timeout_s: float = 2.0) -> str | None:
    """Why a `protocol` ("grpc" or "http") client may not reach Triton at `address` ("host:port", as
    `parse_address` returns it): the port answers the other protocol (Triton's HTTP port given where gRPC is
    expected, or an http:// url on its gRPC port). One sentence with the fix, or None when the port does not
    answer the other protocol (down, or something else listens there). Probes the port: for error paths only."""
    host = address.rsplit(":", 1)[0]
    status = http_status(address, timeout_s) if protocol == "grpc" else None
    if status is not None and status != 200:
        return (f"{address} answers HTTP but not as Triton does (GET /v2: HTTP {status}): it is no Triton port "
                f"(Triton's metrics port, default {DEFAULT_PORTS['metrics']}, or a dyngate gateway?); give Triton's "
                f"gRPC port, e.g. {host}:{DEFAULT_PORTS['grpc']} (`dyngate serve` prints it as grpc://...)")
    if status == 200:
        return (f"{address} answers HTTP, not gRPC: it may be Triton's HTTP port (default "
                f"{DEFAULT_PORTS['http']}) where its gRPC port is expected; give Triton's gRPC port, e.g. "
                f"{host}:{DEFAULT_PORTS['grpc']} (`dyngate serve` prints it as grpc://...), or, where HTTP is taken "
                f"(dyngate predict), the url http://{address}")
    if protocol == "http" and speaks_http2(address, timeout_s):
        return (f"{address} answers gRPC (HTTP/2), not HTTP/1.1: it may be Triton's gRPC port (default "
                f"{DEFAULT_PORTS['grpc']}) given with an http:// scheme; drop http:// to talk gRPC to it "
                f"({address}), or give Triton's HTTP port, e.g. http://{host}:{DEFAULT_PORTS['http']}")
    return None


def http_endpoint_problem(address: str, timeout_s: float = 2.0) -> str | None:
    """Why `address` ("host:port"), given as Triton's HTTP endpoint for inference (the gateway's --triton-http,
    `AsyncTritonClient`'s infer_url), is not one: it speaks gRPC (Triton's gRPC port) or answers HTTP but not
    Triton's GET /v2 (its metrics port answers every GET with 200), or nothing answers there. One sentence with
    the fix, or None when it is Triton's HTTP port. Probes the port: for error paths and status checks."""
    fix = (f"give Triton's HTTP port as --triton-http (default {DEFAULT_PORTS['http']}), or leave --triton-http "
           "out to send inference over gRPC")
    status = http_status(address, timeout_s)
    if status == 200:
        return None
    if status is not None:
        return (f"{address} answers HTTP but not as Triton does (GET /v2: HTTP {status}; Triton's metrics port, "
                f"default {DEFAULT_PORTS['metrics']}?); {fix}")
    if speaks_http2(address, timeout_s):
        return f"{address} answers gRPC (HTTP/2): it is Triton's gRPC port, not its HTTP port; {fix}"
    return (f"nothing answers HTTP at {address} (Triton down or restarting, or not its address); if Triton runs, "
            f"{fix}")


def speaks_http2(address: str, timeout_s: float = 2.0) -> bool:
    """Whether `address` ("host:port") speaks HTTP/2, as a gRPC server does: it answers the client connection
    preface (RFC 9113 section 3.4) with a SETTINGS frame (type 0x4). An HTTP client given Triton's gRPC port
    only hears bytes that are no HTTP/1.1 status line."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            head = sock.recv(9)
    except OSError:
        return False
    return len(head) == 9 and head[3] == 0x04


def http_status(address: str, timeout_s: float = 2.0) -> int | None:
    """How `address` ("host:port") answers Triton's server metadata request GET /v2 over HTTP/1.1: 200 when the
    answer is Triton's ({"name", "version", "extensions"}: Triton's HTTP port), the status of any other answer
    (a 200 that is not Triton's, as its metrics port gives for every path, counts as 404), None when it does
    not answer HTTP/1.1 (a gRPC client given Triton's HTTP port only hears "Socket closed")."""
    try:
        with DIRECT.open(f"http://{address}/v2", timeout=timeout_s) as response:
            body = response.read(65536)
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None
    try:
        return 200 if "extensions" in json.loads(body) else 404
    except (ValueError, TypeError):
        return 404
