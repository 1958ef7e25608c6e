"""A real cell (admin and model server processes) with SmolLM2 and test.TinyLM published, and
gateways serving it from threads of the test process on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import sax
from gateway.config import GatewaySettings
from tests.gateway.servers import DOWN_CELL, SMOLLM2, TINY, GatewayCell, RunningGateway, serve
from tests.integration.cluster import Cluster, wait_for


@pytest.fixture(scope="module")
def gateway_cell(tmp_path_factory, smollm2_checkpoint) -> Iterator[GatewayCell]:
    workdir = tmp_path_factory.mktemp("gateway-cell")
    c = Cluster(root=str(workdir / "sax-root"), workdir=workdir)
    down = Cluster(root=c.root, workdir=tmp_path_factory.mktemp("down-cell"), cell=DOWN_CELL)
    gateways: list[RunningGateway] = []
    try:
        for cluster in (c, down):
            r = cluster.saxutil("create", cluster.cell)
            assert r.returncode == 0, r.stderr
        down.start_admin()
        down.close()  # its location record now names a dead admin
        c.start_admin()
        c.start_model_server()
        for args in (
            (SMOLLM2, "llama.SmolLM2_135M", smollm2_checkpoint, "1"),
            (TINY, "test.TinyLM", "None", "1"),
        ):
            r = c.saxutil("publish", *args)
            assert r.returncode == 0, r.stderr
        for model in (SMOLLM2, TINY):
            wait_for(lambda m=model: c.ready_addresses(m), 120, f"{model} to load", interval=0.2)
        main = serve(GatewaySettings(sax_root=c.root, admin_timeout=5.0, timeout=60.0))
        gateways.append(main)
        strict = serve(
            GatewaySettings(
                sax_root=c.root,
                sax_cell=DOWN_CELL,
                timeout=2.0,
                admin_timeout=1.0,
                health_timeout=1.0,
                max_concurrent_calls=1,
            )
        )
        gateways.append(strict)
        yield GatewayCell(c, main, strict)
    finally:
        for g in gateways:
            g.close()
        c.close()
        sax.SetSaxRoot(None)
