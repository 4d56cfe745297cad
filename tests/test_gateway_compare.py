"""The Compare tab's load driver (dyngate_gateway.compare) against the session's real Triton. No gateway runs in
this module: its status polls would open connections to Triton of their own. No timing assertions.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from dyngate_gateway import compare
from dyngate_gateway.handlers import load_catalog

TEXT_MODEL = "distilbert-tiny"


def test_timed_requests_reuse_the_warmed_connections(built_repository, triton):
    """Found in a review: every timed run made fresh Triton clients (a new gRPC connection and a model-metadata
    lookup inside its first round trips) while the warm-up had run on another client. Now a run makes and warms its
    clients once: the timed requests of every level and variant go over the connections the warm-up opened, as many
    as the highest concurrency level."""
    grpc_port = int(triton.endpoints["grpc"].rsplit(":", 1)[1])
    me = psutil.Process()

    def connections() -> set[int]:  # local ports of this process's connections to Triton's gRPC port
        return {c.laddr.port for c in me.net_connections("tcp")
                if c.raddr and c.raddr.port == grpc_port and c.status == psutil.CONN_ESTABLISHED}

    seen: list[set[int]] = []
    view = load_catalog(Path(built_repository))[TEXT_MODEL]
    variants = {name: entry.name for name, entry in view.variants.items()}
    assert len(variants) >= 2
    before = connections()
    result = compare.run_benchmark(triton.endpoints["grpc"], "grpc", variants, [b"a fine film", b"dull and long"],
                                   requests=6, concurrency=[1, 2], progress=lambda *_: seen.append(connections()))
    assert not result.errors and len(result.rows) == 2 * len(variants)
    used = set().union(*seen) - before
    assert 1 <= len(used) <= 2, f"{len(used)} connections to Triton during the timed requests: {sorted(used)}"
