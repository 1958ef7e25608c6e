"""One SmolLM2 served by two processes (four host devices each, mesh 1x1x8 over both) in a real
cell, next to a one-process torch server: the admin places each published mesh only on the
server whose devices it fits, and `saxutil lm.generate` gives the same text through both."""

from __future__ import annotations

import os
import socket

import pytest

from tests.integration.cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

SHARDED = "/sax/test/smol8"
SINGLE = "/sax/test/smol1"
OVERRIDES = ("INPUT_SEQ_LEN=32", "BUCKET_KEYS=[32]", "BATCH_SIZE=[1,4]", "MAX_DECODE_STEPS=16")
PROMPTS = ("The capital of France is", "Once upon a time, a")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    c.env = {**env, "SAX_ROOT": c.root, "PYTHONUNBUFFERED": "1"}
    assert c.saxutil("create", c.cell).returncode == 0
    yield c
    c.close()


def test_two_processes_serve_one_mesh(cluster: Cluster, smollm2_checkpoint: str, tmp_path) -> None:
    c = cluster
    c.start_admin()
    cache = tmp_path / "jax-cache"
    group = [
        f"--jax_cache_dir={cache}",
        f"--jax_coordinator=127.0.0.1:{free_port()}",
        "--jax_num_processes=2",
        f"--jax_control_port={free_port()}",
        "--platform_chip=cpu",
        "--platform_topology=8",
    ]
    follower = c.start_follower(*group, "--jax_process_id=1")
    leader = c.start_model_server(*group, "--jax_process_id=0", "--backend=jax")
    torch_server = c.start_model_server("--backend=torch")
    for model, mesh in ((SHARDED, "[1,1,8]"), (SINGLE, "[1,1,1]")):
        r = c.saxutil(
            "publish",
            model,
            "llama.SmolLM2_135M",
            smollm2_checkpoint,
            "1",
            *OVERRIDES,
            f"ICI_MESH_SHAPE={mesh}",
        )
        assert r.returncode == 0, r.stderr
    for model, server in ((SHARDED, leader), (SINGLE, torch_server)):
        wait_for(
            lambda m=model: c.ready_addresses(m),
            240,
            f"{model} to load\n{c.logs()}",
            interval=0.5,
        )
        assert c.ready_addresses(model) == [server.address]
    assert any(cache.iterdir()), "nothing in the persistent compilation cache"
    log = leader.log.read_text()
    assert "follower process(es)" in log and "mesh {'replica': 1, 'data': 1, 'model': 8}" in log
    for prompt in PROMPTS:
        got = c.saxutil(
            "lm.generate", "-terse", "-extra=temperature:0", SHARDED, prompt, timeout=120
        )
        want = c.saxutil(
            "lm.generate", "-terse", "-extra=temperature:0", SINGLE, prompt, timeout=120
        )
        assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr + c.logs()
        assert got.stdout.strip() and got.stdout == want.stdout
    # Unpublishing unloads on both processes; the follower keeps running until process 0 stops.
    assert c.saxutil("unpublish", SHARDED).returncode == 0
    wait_for(lambda: "runner closed" in follower.log.read_text(), 60, "the follower to unload")
    assert follower.alive()
    leader.kill(15)
    follower.popen.wait(timeout=60)
    assert follower.popen.returncode == 0, c.logs()
