"""saxutil, run in-process through sax.cli.main.main(argv) against the fake servers."""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

import sax
from sax.cli import main as cli_main
from sax.cli.common import flag, parse_duration
from sax.cli.lm_cmds import parse_extra
from sax.cli.main import CommandRegistry, main
from sax.cli.table import format_table
from sax.v1 import lm_pb2

if TYPE_CHECKING:
    from conftest import AdminHandle, Cluster, FakeLM

M = "/sax/test/tiny"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs saxutil; returns (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("saxutil: "), err
    return lines[0]


def test_format_table() -> None:
    text = format_table(["#", "Model ID"], [[0, "a"], [12, "two\nlines"]])
    assert text == (
        "+----+----------+\n"
        "| #  | Model ID |\n"
        "+----+----------+\n"
        "|  0 | a        |\n"
        "| 12 | two      |\n"
        "|    | lines    |\n"
        "+----+----------+\n"
    )


def test_create_and_ls_cells(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "root")
    assert run(capsys, "--sax_root", root, "create", "/sax/test")[0] == 0
    assert run(capsys, f"-sax_root={root}", "create", "/sax/prod", "", "acl/all")[0] == 0
    code, out, _ = run(capsys, "ls", "/sax", f"--sax_root={root}")
    assert code == 0
    assert out == (
        "+---+-----------+\n"
        "| # |   Cell    |\n"
        "+---+-----------+\n"
        "| 0 | /sax/prod |\n"
        "| 1 | /sax/test |\n"
        "+---+-----------+\n"
    )
    code, out, _ = run(capsys, "ls", "-json", f"--sax_root={root}")
    assert json.loads(out) == ["/sax/prod", "/sax/test"]
    code, _, err = run(capsys, f"--sax_root={root}", "create", "/sax/test")
    assert code == 1 and "ALREADY_EXISTS" in _error_line(err)


def test_ls_cell_and_model(
    cluster: Cluster, admin: AdminHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    admin.fake.add_model(M)
    admin.fake.add_model("/sax/test/big", path="llama.SmolLM2_135M", replicas=3)
    admin.fake.set_addresses(M, ["10.0.0.1:14001"])
    root = f"--sax_root={cluster.root}"

    code, out, _ = run(capsys, root, "ls", "/sax/test")
    assert code == 0
    assert out == (
        "+---+----------+\n"
        "| # | Model ID |\n"
        "+---+----------+\n"
        "| 0 | big      |\n"
        "| 1 | tiny     |\n"
        "+---+----------+\n"
    )
    code, out, _ = run(capsys, root, "ls", M)
    assert code == 0
    border = "+----------------+-------------+-----------------+---------------+" + "-" * 28 + "+"
    assert out.splitlines() == [
        border,
        "|     Model      | Model Path  | Checkpoint Path | # of Replicas |"
        " (Selected) Replica Address |",
        border,
        "| /sax/test/tiny | test.TinyLM | None            |             1 |"
        " 10.0.0.1:14001             |",
        border,
    ]
    code, out, _ = run(capsys, root, "ls", "--json", M)
    record = json.loads(out)
    assert (record["active_replicas"], record["requested_replicas"]) == (1, 1)
    assert record["addresses"] == ["10.0.0.1:14001"]
    code, out, _ = run(capsys, root, "ls", "--json", "/sax/test")
    assert json.loads(out) == ["/sax/test/big", M]

    code, out, err = run(capsys, root, "ls", "/sax/test/nope")
    assert code == 1 and out == ""
    assert "NOT_FOUND" in _error_line(err)


def test_publish_update_unpublish(
    cluster: Cluster, admin: AdminHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    root = f"--sax_root={cluster.root}"
    code, _, err = run(
        capsys,
        root,
        "publish",
        M,
        "test.TinyLM",
        "None",
        "2",
        "BATCH_SIZE=4",
        "BUCKET_KEYS=[128,256]",
        'NAME="a=b"',
    )
    assert code == 0, err
    model = admin.fake.models[M]
    assert (model.model_path, model.checkpoint_path, model.requested_num_replicas) == (
        "test.TinyLM",
        "None",
        2,
    )
    assert dict(model.overrides) == {
        "BATCH_SIZE": "4",
        "BUCKET_KEYS": "[128,256]",
        "NAME": '"a=b"',
    }

    assert run(capsys, root, "update", "-replicas=3", M)[0] == 0
    assert admin.fake.models[M].requested_num_replicas == 3
    assert run(capsys, root, "update", "--replicas", "1", M)[0] == 0
    assert admin.fake.models[M].requested_num_replicas == 1
    assert run(capsys, root, "update_checkpoint", M, "/ckpt/v2")[0] == 0
    model = admin.fake.models[M]
    assert (model.checkpoint_path, model.requested_num_replicas) == ("/ckpt/v2", 1)
    assert dict(model.overrides)["BATCH_SIZE"] == "4"

    code, out, err = run(capsys, root, "update", M)
    assert code == 1 and out == "" and "-replicas=N" in _error_line(err)

    assert run(capsys, root, "unpublish", M)[0] == 0
    assert M not in admin.fake.models


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["publish", M, "test.TinyLM", "None", "1", "BATCH_SIZE"], "not KEY=VALUE"),
        (["publish", M, "test.TinyLM", "None", "-1"], "replicas must be"),
        (["publish", M, "test.TinyLM", "None", "two"], "replicas must be"),
        (["publish", "/sax/test/Bad!", "test.TinyLM", "None", "1"], "INVALID_ARGUMENT"),
        (["publish", M, "test.TinyLM", "None", "1"], "ALREADY_EXISTS"),
        (["unpublish", "/sax/test/nope"], "NOT_FOUND"),
        (["lm.generate", "tiny", "q"], "invalid model id"),
        (["lm.generate", "-extra=temperature", M, "q"], "not KEY:VALUE"),
        (["lm.generate", "-stream", "-terse", M, "q"], "cannot be combined"),
        (["--sax_timeout=soon", "ls"], "bad duration"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        ([], "no command given"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    cluster: Cluster,
    admin: AdminHandle,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    needle: str,
) -> None:
    admin.fake.add_model(M)
    published = dict(admin.fake.models)
    code, out, err = run(capsys, f"--sax_root={cluster.root}", *argv)
    assert code == 1 and out == ""
    assert needle in _error_line(err)
    assert admin.fake.models == published


def test_missing_sax_root(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("SAX_ROOT", raising=False)
    code, out, err = run(capsys, "ls", "/sax")
    assert code == 1 and out == ""
    assert "--sax_root" in _error_line(err)
    code, out, err = run(capsys, "--sax_root", str(tmp_path / "nowhere"), "ls", "/sax")
    assert code == 1 and "does not exist" in _error_line(err)


def test_debug_prints_the_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAX_ROOT", raising=False)
    monkeypatch.setenv("SAX_DEBUG", "1")
    code, _, err = run(capsys, "ls", "/sax/test")
    assert code == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("saxutil: ")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lm.generate", "--help")
    assert code == 0 and "examples:" in out and "-extra" in out
    code, out, _ = run(capsys, "help", "publish")
    assert code == 0 and "KEY=VALUE" in out


def test_parse_extra_and_duration() -> None:
    options = parse_extra("temperature:0.2,stop:'\\n',mode:greedy,q:\"1.5\",steps:64")
    proto = options.ToProto()
    assert dict(proto.items) == pytest.approx({"temperature": 0.2, "steps": 64.0})
    assert dict(proto.strings) == {"stop": "\\n", "mode": "greedy", "q": "1.5"}
    assert parse_extra("").ToProto().ByteSize() == 0
    assert [parse_duration(t) for t in ("60", "60s", "2m", "1m30s", "500ms", "1.5")] == [
        60,
        60,
        120,
        90,
        0.5,
        1.5,
    ]


@pytest.fixture
def served(cluster: Cluster, admin: AdminHandle) -> FakeLM:
    """M published with one fake replica; returns the replica's servicer."""
    fake, _, address = cluster.start_lm("r1")
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [address])
    return fake


def test_lm_generate(
    cluster: Cluster,
    served: FakeLM,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = f"--sax_root={cluster.root}"
    code, out, _ = run(capsys, root, "lm.generate", "-extra=temperature:0.2,stop:'.'", M, "Hi")
    assert code == 0
    assert out.splitlines() == [
        "+----------+-------+",
        "| generate | Score |",
        "+----------+-------+",
        "| r1:Hi    |  -1.5 |",
        "| r1:alt   |  -0.5 |",
        "+----------+-------+",
    ]
    extra = served.requests[-1].extra_inputs
    assert dict(extra.items) == pytest.approx({"temperature": 0.2})
    assert dict(extra.strings) == {"stop": "."}

    code, out, _ = run(capsys, root, "lm.generate", "--terse", "--extra", "t:1", M, "Hi")
    assert out == "r1:alt\nr1:Hi\n"
    code, out, _ = run(capsys, root, "lm.generate", "-n=1", "-json", M, "Hi")
    assert json.loads(out) == [{"text": "r1:Hi", "score": -1.5}]

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    code, out, _ = run(capsys, root, "lm.generate", "-terse=true", M, "-")
    assert out.splitlines()[1] == "r1:from stdin"


def test_lm_generate_stream(
    cluster: Cluster, served: FakeLM, capsys: pytest.CaptureFixture[str]
) -> None:
    served.stream = [
        lm_pb2.GenerateStreamResponse(items=[lm_pb2.GenerateStreamItem(text="Hel", scores=[-1])]),
        lm_pb2.GenerateStreamResponse(
            items=[lm_pb2.GenerateStreamItem(text="lo", prefix_len=3, scores=[-2.25])]
        ),
    ]
    code, out, _ = run(capsys, f"--sax_root={cluster.root}", "lm.generate", "-stream", M, "q")
    assert code == 0
    assert out == "Hello\nScores: -2.25\n"


def test_lm_score(cluster: Cluster, served: FakeLM, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, f"--sax_root={cluster.root}", "lm.score", M, "Q:", "a", "bcd")
    assert code == 0
    assert out.splitlines() == [
        "+--------+-------+",
        "| Suffix | Score |",
        "+--------+-------+",
        "| a      |    -1 |",
        "| bcd    |    -3 |",
        "+--------+-------+",
    ]
    assert served.requests[-1].prefix == "Q:"


def test_watch(cluster: Cluster, admin: AdminHandle, capsys: pytest.CaptureFixture[str]) -> None:
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, ["10.0.0.1:1"])
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            main([f"--sax_root={cluster.root}", "watch", "-max_updates=3", M])
        )
    )
    thread.start()
    try:
        admin.fake.wait_for(lambda: admin.fake.watch_sent == 1)
        admin.fake.set_addresses(M, ["10.0.0.1:1", "10.0.0.2:1"])
        admin.fake.wait_for(lambda: admin.fake.watch_sent == 2)
        admin.fake.set_addresses(M, ["10.0.0.2:1"])
    finally:
        thread.join(timeout=10)
    assert result == [0]
    out = capsys.readouterr().out
    assert out == "Reset\n+ 10.0.0.1:1\n+ 10.0.0.2:1\n- 10.0.0.1:1\n"


class _EntryPoint:
    """Stands in for an importlib.metadata.EntryPoint of the saxutil.commands group."""

    def __init__(self, name: str, load: Callable[[], object]) -> None:
        self.name, self.value, self._load = name, f"plugin:{name}", load

    def load(self) -> object:
        return self._load()


def _register_hello(commands: CommandRegistry) -> None:
    p = commands.add("hello", _cmd_hello, "say hello", "example:\n  saxutil hello -loud world")
    flag(p, "loud", action="store_true", help="shout")
    p.add_argument("who")


def _cmd_hello(args: argparse.Namespace) -> int:
    if args.who == "nobody":
        raise sax.errors.NotFoundError("nobody is there")
    text = f"hello {args.who}"
    print(text.upper() if args.loud else text)
    return 0


def _missing_package() -> object:
    raise ModuleNotFoundError("No module named 'tools'", name="tools")


def test_commands_of_other_packages_come_from_entry_points(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    found = [
        _EntryPoint("convert", _missing_package),  # its package is not installed: skipped
        _EntryPoint("hello", lambda: _register_hello),
        _EntryPoint("ls", lambda: lambda commands: commands.add("ls", _cmd_hello, "clash")),
    ]
    asked: list[str] = []

    def entry_points(group: str) -> list[_EntryPoint]:
        asked.append(group)
        return found

    monkeypatch.setattr(cli_main.metadata, "entry_points", entry_points)
    code, out, _ = run(capsys, "--help")
    assert code == 0 and asked[-1] == "saxutil.commands"
    assert "hello               say hello" in out and "convert" not in out
    assert out.index("lm.score") < out.index("hello") < out.index("help ")
    assert run(capsys, "hello", "world") == (0, "hello world\n", "")
    assert run(capsys, "hello", "-loud=true", "world")[:2] == (0, "HELLO WORLD\n")
    assert run(capsys, "hello", "-loud=false", "world")[:2] == (0, "hello world\n")
    code, out, _ = run(capsys, "help", "hello")
    assert code == 0 and "saxutil hello -loud world" in out and "-sax_root" in out
    code, _, err = run(capsys, "hello", "nobody")
    assert code == 1 and _error_line(err) == "saxutil: hello: NOT_FOUND: nobody is there"
    code, _, err = run(capsys, "hello")
    assert code == 1 and "hello: the following arguments are required: who" in _error_line(err)
    code, _, err = run(capsys, "convert", "--from", "hf", "a", "b")
    assert code == 1 and "unknown command 'convert'" in _error_line(err)

    # The built-in commands are untouched: `ls` is still the real one.
    root = str(tmp_path / "root")
    assert run(capsys, "--sax_root", root, "create", "/sax/test")[0] == 0
    code, out, _ = run(capsys, "ls", "-json=true", f"--sax_root={root}")
    assert (code, json.loads(out)) == (0, ["/sax/test"])


def test_unreadable_entry_points_leave_the_other_commands(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def entry_points(group: str) -> list[_EntryPoint]:
        raise OSError("broken metadata")

    monkeypatch.setattr(cli_main.metadata, "entry_points", entry_points)
    root = str(tmp_path / "root")
    assert run(capsys, "--sax_root", root, "create", "/sax/test")[0] == 0
    code, out, _ = run(capsys, "--sax_root", root, "ls", "--json")
    assert (code, json.loads(out)) == (0, ["/sax/test"])
