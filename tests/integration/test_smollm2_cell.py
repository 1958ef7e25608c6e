"""The real small model through a whole cell: converted checkpoint, admin, model server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.cluster import Cluster, wait_for

MODEL = "/sax/test/smollm2"
CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.slow
def test_smollm2_answers_paris_through_the_cell(local_cluster: Cluster, smollm2_checkpoint) -> None:
    c = local_cluster
    c.start_admin()
    c.start_model_server()
    r = c.saxutil("publish", MODEL, "llama.SmolLM2_135M", smollm2_checkpoint, "1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(c.ready_addresses(MODEL)) == 1, 120, "SmolLM2 to load", interval=0.5)
    r = c.saxutil("lm.generate", "-extra=temperature:0", MODEL, CHAT, timeout=120)
    assert r.returncode == 0, r.stderr + c.logs()
    assert "Paris" in r.stdout, r.stdout


@pytest.mark.slow
def test_checkpoint_without_markers_fails_and_server_keeps_serving(
    local_cluster: Cluster, smollm2_checkpoint, tmp_path
) -> None:
    c = local_cluster
    c.start_admin()
    c.start_model_server()
    r = c.saxutil("publish", "/sax/test/tiny", "test.TinyLM", "None", "1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: c.ready_addresses("/sax/test/tiny"), 30, "tiny to load")

    broken = tmp_path / "broken"
    shutil.copytree(smollm2_checkpoint, broken)
    marker = next(broken.glob("checkpoint_*/state/commit_success.txt"))
    marker.unlink()
    r = c.saxutil("publish", MODEL, "llama.SmolLM2_135M", str(broken), "1")
    assert r.returncode == 0, r.stderr

    def failed_row() -> str:
        out = c.saxutil("ls", MODEL).stdout
        return out if "FAILED" in out else ""

    out = wait_for(failed_row, 60, "the load to fail", interval=0.5)
    assert "commit_success.txt" in out, out
    r = c.saxutil("lm.generate", "/sax/test/tiny", "Hello")
    assert r.returncode == 0, r.stderr
    assert Path(marker).name == "commit_success.txt"
