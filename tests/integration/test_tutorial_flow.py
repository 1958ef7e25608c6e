"""The Saxml tutorial flow, end to end, with an admin and two model servers as processes."""

from __future__ import annotations

import pytest

from tests.integration.cluster import Cluster, wait_for

MODEL = "/sax/test/tiny"


@pytest.mark.slow
def test_tutorial_flow(any_cluster: Cluster) -> None:
    c = any_cluster
    r = c.saxutil("create", c.cell)
    assert r.returncode == 0, r.stderr
    c.start_admin()
    ms = [c.start_model_server(), c.start_model_server()]

    r = c.saxutil("publish", MODEL, "test.TinyLM", "None", "2")
    assert r.returncode == 0, r.stderr + c.logs()
    wait_for(lambda: len(c.ready_addresses(MODEL)) == 2, 30, "2 replicas", interval=0.2)
    assert sorted(c.ready_addresses(MODEL)) == sorted(p.address for p in ms)

    r = c.saxutil("ls", MODEL)
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if "Model Path" in line)
    assert "Checkpoint Path" in header and "# of Replicas" in header
    row = next(line for line in r.stdout.splitlines() if "test.TinyLM" in line)
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[:4] == [MODEL, "test.TinyLM", "None", "2"]
    assert cells[4] in {p.address for p in ms}

    r = c.saxutil("ls", "/sax")
    assert r.returncode == 0 and "/sax/test" in r.stdout, r.stderr
    r = c.saxutil("ls", c.cell)
    assert r.returncode == 0 and "tiny" in r.stdout, r.stderr

    r = c.saxutil(
        "lm.generate", "-extra=temperature:0.2", MODEL, "Q: Who is Harry Potter's mother? A:"
    )
    assert r.returncode == 0, r.stderr + c.logs()
    lines = r.stdout.splitlines()
    assert any("generate" in line and "Score" in line for line in lines), r.stdout
    # Two samples (NUM_SAMPLES of test.TinyLM), each with a negative log-probability score.
    rows = [line for line in lines if line.startswith("|") and "Score" not in line]
    assert len(rows) == 2, r.stdout
    scores = [float(row.strip("|").split("|")[-1]) for row in rows]
    assert all(s < 0 for s in scores), scores

    r = c.saxutil("lm.generate", "-stream", MODEL, "Hello")
    assert r.returncode == 0, r.stderr
    assert "Scores:" in r.stdout, r.stdout

    r = c.saxutil("lm.score", MODEL, "Q: Who? A:", " Lily", " zzzz")
    assert r.returncode == 0, r.stderr
    assert "Lily" in r.stdout and "zzzz" in r.stdout
