"""Bad input never yields INTERNAL or breaks a server: property-based tests over Generate,
GenerateStream and Score (a TinyLM and an engine servable over the fake runner), Publish and
Update on a real admin, and `saxutil` arguments run in process.

Properties: every refusal carries a client-error status code (never INTERNAL or UNKNOWN), the
server answers a good request afterwards, and saxutil exits 0, 1 or 2 with one line on error and
never a traceback or an "unexpected error".
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from admin_server.config import AdminConfig
from admin_server.server import AdminServer
from model_server.config import ModelServerConfig
from model_server.engine.engine_servable import EngineServable
from model_server.engine.tokenizer import Tokenizer
from model_server.loader import build_servable
from model_server.server import ModelServer
from sax import cell as cell_layout
from sax.cli import main as cli_main
from sax.naming import parse_cell
from sax.storage.local import LocalStore
from sax.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    lm_pb2,
    lm_pb2_grpc,
    modelet_pb2,
    modelet_pb2_grpc,
)
from servables import registry
from servables.sampling_params import SamplingParams
from servables.servable_config import ServableConfig, apply_overrides
from tests.faults.report import record
from tests.model_server.conftest import LoopThread, wait_for
from tests.model_server.engine.fakes import FakeRunner, write_tokenizer

CELL = "/sax/test"
TINY = "/sax/test/tiny"
ENGINE = "/sax/test/engine"
ENGINE_CONFIG = "llama.SmolLM2_135M"
ENGINE_OVERRIDES = {
    "INPUT_SEQ_LEN": "32",
    "MAX_DECODE_STEPS": "8",
    "BUCKET_KEYS": "[16, 32]",
    "BATCH_SIZE": "[1, 2, 4]",
}
# Codes that mean "the server failed", never "the request was wrong".
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
EXAMPLES = 50


@dataclass
class Tally:
    """Examples run and INTERNAL/UNKNOWN answers seen, over the whole module."""

    examples: int = 0
    internal: int = 0
    failures: list[str] = field(default_factory=list)

    codes: dict[str, int] = field(default_factory=dict)

    def code(self, what: str, code: grpc.StatusCode | None) -> None:
        self.examples += 1
        name = code.name if code is not None else "OK"
        self.codes[name] = self.codes.get(name, 0) + 1
        if code in BAD_CODES:
            self.internal += 1
            self.failures.append(f"{what}: {code}")


TALLY = Tally()


@dataclass
class Env:
    """A cell in this process: an admin, a joined TinyLM server and a standalone engine server."""

    root: str
    loop: LoopThread
    admin: AdminServer
    tiny_server: ModelServer
    engine_server: ModelServer
    channels: list[grpc.Channel] = field(default_factory=list)

    def _channel(self, address: str) -> grpc.Channel:
        ch = grpc.insecure_channel(address)
        self.channels.append(ch)
        return ch

    def __post_init__(self) -> None:
        self.admin_stub = admin_pb2_grpc.AdminStub(self._channel(self.admin.config.address))
        self.lm = {
            TINY: lm_pb2_grpc.LMServiceStub(self._channel(self.tiny_server.address)),
            ENGINE: lm_pb2_grpc.LMServiceStub(self._channel(self.engine_server.address)),
        }


def _engine_builder(tokenizer: Tokenizer) -> Callable[[ServableConfig, str], EngineServable]:
    def build(config: ServableConfig, checkpoint: str) -> EngineServable:
        runner = FakeRunner(num_slots=4, max_seq_len=config.input_seq_len + 8)
        return EngineServable(config, runner, tokenizer)

    return build


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("bad-input-root")
    cell_layout.create_cell(LocalStore(root), parse_cell(CELL))
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))
    loop = LoopThread()
    admin = AdminServer(
        AdminConfig(
            sax_cell=CELL,
            sax_root=str(root),
            port=0,
            host="127.0.0.1",
            poll_period_s=0.2,
            dead_after_s=30,
            adopt_grace_s=0,
        )
    )
    loop.run(admin.start())
    tiny_server = ModelServer(
        ModelServerConfig(
            host="127.0.0.1", port=0, sax_cell=CELL, sax_root=str(root), join_period_s=0.2
        ),
        builder=build_servable,
    )
    loop.run(tiny_server.start())
    engine_server = ModelServer(
        ModelServerConfig(host="127.0.0.1", port=0), builder=_engine_builder(tokenizer)
    )
    loop.run(engine_server.start())
    e = Env(str(root), loop, admin, tiny_server, engine_server)
    try:
        modelet = modelet_pb2_grpc.ModeletStub(e._channel(engine_server.address))
        modelet.Load(
            modelet_pb2.LoadRequest(
                model_key=ENGINE,
                model_path=ENGINE_CONFIG,
                checkpoint_path="fake",
                overrides=ENGINE_OVERRIDES,
            ),
            timeout=60,
        )
        e.admin_stub.Publish(
            admin_pb2.PublishRequest(
                model=admin_pb2.Model(
                    model_id=TINY,
                    model_path="test.TinyLM",
                    checkpoint_path="None",
                    requested_num_replicas=1,
                )
            ),
            timeout=10,
        )
        e.admin_stub.WaitForReady(
            admin_pb2.WaitForReadyRequest(model_id=TINY, num_replicas=1), timeout=60
        )
        yield e
    finally:
        for ch in e.channels:
            ch.close()
        for server in (engine_server, tiny_server):
            loop.run(server.stop(0))
        loop.run(admin.stop(0))
        loop.close()
        if TALLY.examples:
            record(
                "bad input",
                "random model keys, texts, extra inputs, overrides, replica counts and saxutil "
                "arguments are refused with a client-error code; servers keep answering",
                {
                    "examples run": str(TALLY.examples),
                    "INTERNAL or UNKNOWN answers": str(TALLY.internal),
                    "outcomes": ", ".join(f"{k} {v}" for k, v in sorted(TALLY.codes.items())),
                },
                test="tests/faults/test_bad_input.py",
            )


# ---------------------------------------------------------------------------- strategies

_KEYS = ["temperature", "per_example_max_decode_steps", "seed", "top_k", "top_p", "stop"]
_KEYS += ["repetition_penalty", "num_samples", ""]
_KEY = st.sampled_from(_KEYS) | st.text(max_size=20)
_NUMBER = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -1.0, 1.0, 0.5, 1e30, -1e30, 2.0**62, 2.0**63, 1e-300, 33.0, 9.0]
)
_TEXT = (
    st.text(max_size=60)
    | st.just("")
    | st.integers(min_value=200, max_value=50_000).map(lambda n: "é" * n)
    | st.sampled_from(["\x00", "\ufffd", "<|im_start|>", "</s>", "🙂" * 40, "\n\t "])
)
# None: the key of the model the request goes to (most examples), else a wrong one.
_MODEL_KEY = (
    st.none()
    | st.none()
    | st.none()
    | st.sampled_from(
        ["", "/sax/test", "/sax/test/", "/sax/other/tiny", "sax/test/tiny", "/sax/test/tiny/x", "x"]
    )
    | st.text(max_size=30)
)
_EXTRA = st.builds(
    lambda items, tensors, strings: common_pb2.ExtraInputs(
        items=items,
        tensors={k: common_pb2.Tensor(values=v) for k, v in tensors.items()},
        strings=strings,
    ),
    st.dictionaries(_KEY, _NUMBER, max_size=4),
    st.dictionaries(_KEY, st.lists(_NUMBER, max_size=4), max_size=2),
    st.dictionaries(_KEY, _TEXT, max_size=2),
)
_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return None


def _good_generate(e: Env, key: str) -> None:
    extra = common_pb2.ExtraInputs(items={"per_example_max_decode_steps": 1.0})
    response = e.lm[key].Generate(
        lm_pb2.GenerateRequest(model_key=key, text="hello", extra_inputs=extra), timeout=30
    )
    assert response.texts


# ---------------------------------------------------------------------------- LM service


@_SETTINGS
@given(target=st.sampled_from([TINY, ENGINE]), key=_MODEL_KEY, text=_TEXT, extra=_EXTRA)
def test_generate_never_internal(env: Env, target: str, key: str | None, text: str, extra) -> None:
    request = lm_pb2.GenerateRequest(
        model_key=target if key is None else key, text=text, extra_inputs=extra
    )
    code = _code(lambda: env.lm[target].Generate(request, timeout=30))
    TALLY.code(f"Generate on {target}: {request}", code)
    assert code not in BAD_CODES, request
    _good_generate(env, target)


@_SETTINGS
@given(target=st.sampled_from([TINY, ENGINE]), key=_MODEL_KEY, text=_TEXT, extra=_EXTRA)
def test_generate_stream_never_internal(
    env: Env, target: str, key: str | None, text: str, extra
) -> None:
    request = lm_pb2.GenerateRequest(
        model_key=target if key is None else key, text=text, extra_inputs=extra
    )
    code = _code(lambda: list(env.lm[target].GenerateStream(request, timeout=30)))
    TALLY.code(f"GenerateStream on {target}: {request}", code)
    assert code not in BAD_CODES, request
    _good_generate(env, target)


@_SETTINGS
@given(
    target=st.sampled_from([TINY, ENGINE]),
    key=_MODEL_KEY,
    prefix=_TEXT,
    suffixes=st.lists(_TEXT, max_size=3),
    extra=_EXTRA,
)
def test_score_never_internal(
    env: Env, target: str, key: str | None, prefix: str, suffixes: list[str], extra
) -> None:
    request = lm_pb2.ScoreRequest(
        model_key=target if key is None else key, prefix=prefix, suffix=suffixes, extra_inputs=extra
    )
    code = _code(lambda: env.lm[target].Score(request, timeout=30))
    TALLY.code(f"Score on {target}: {request}", code)
    assert code not in BAD_CODES, request
    _good_generate(env, target)


# ---------------------------------------------------------------------------- admin

_OVERRIDE_KEY = st.sampled_from(
    ["BATCH_SIZE", "INPUT_SEQ_LEN", "MAX_DECODE_STEPS", "NUM_SAMPLES", "BUCKET_KEYS", "SEED"]
    + ["EXTRA_INPUTS"] * 3
) | st.text(max_size=12)
_OVERRIDE_VALUE = st.sampled_from(
    [
        *["1", "0", "-1", "4", "[1, 4]", "[]", '"x"', "null", "true", "1e309", "NaN", "[1, [2]]"],
        *['{"temperature": "x"}', '{"temperature": -1}', '{"seed": 0.5}', '{"top_p": 0}'],
        *['{"temperature": 0.2, "per_example_max_decode_steps": 4}', "{}"],
    ]
) | st.text(max_size=12)
_MODEL = st.builds(
    admin_pb2.Model,
    model_id=st.sampled_from(["/sax/test/fuzz", TINY, "/sax/other/m", "/sax/test/Bad!", ""])
    | st.text(max_size=20).map(lambda s: "/sax/test/" + s),
    model_path=st.sampled_from(["test.TinyLM", ENGINE_CONFIG, "", "no.Such", "test."])
    | st.text(max_size=12),
    checkpoint_path=st.sampled_from(["None", "", "/tmp/x", "gs://b/c", "../..", "a b"])
    | st.text(max_size=12),
    requested_num_replicas=st.integers(min_value=-(2**31), max_value=2**31 - 1)
    | st.integers(min_value=-2, max_value=3),
    overrides=st.dictionaries(_OVERRIDE_KEY, _OVERRIDE_VALUE, max_size=3),
)


def _published(env: Env) -> list[str]:
    resp = env.admin_stub.List(admin_pb2.ListRequest(), timeout=10)
    return sorted(p.model.model_id for p in resp.published_models)


@_SETTINGS
@given(model=_MODEL, update=st.booleans())
def test_publish_and_update_never_internal(env: Env, model: admin_pb2.Model, update: bool) -> None:
    if update:
        code = _code(
            lambda: env.admin_stub.Update(admin_pb2.UpdateRequest(model=model), timeout=30)
        )
    else:
        code = _code(
            lambda: env.admin_stub.Publish(admin_pb2.PublishRequest(model=model), timeout=30)
        )
    TALLY.code(f"{'Update' if update else 'Publish'}: {model}", code)
    assert code not in BAD_CODES, model
    if code is None:  # accepted: requests without extra inputs must be valid for it
        config = apply_overrides(registry.get(model.model_path), dict(model.overrides))
        SamplingParams.defaults(config)
    # Clean up an accepted change so every example starts from the same published state.
    for model_id in _published(env):
        if model_id != TINY:
            env.admin_stub.Unpublish(admin_pb2.UnpublishRequest(model_id=model_id), timeout=30)
    if update and code is None and model.model_id == TINY:
        env.admin_stub.Update(
            admin_pb2.UpdateRequest(
                model=admin_pb2.Model(
                    model_id=TINY,
                    model_path="test.TinyLM",
                    checkpoint_path="None",
                    requested_num_replicas=1,
                )
            ),
            timeout=30,
        )
    assert _published(env) == [TINY]
    env.admin_stub.WaitForReady(
        admin_pb2.WaitForReadyRequest(model_id=TINY, num_replicas=1), timeout=60
    )
    _good_generate(env, TINY)


# ---------------------------------------------------------------------------- saxutil

_COMMANDS = [
    "create",
    "ls",
    "publish",
    "unpublish",
    "update",
    "update_checkpoint",
    "watch",
    "lm.generate",
    "lm.score",
    "estimate",
    "help",
    "bogus",
]
_ARG = st.sampled_from(
    [
        TINY,
        "/sax/test",
        "/sax",
        "/sax/nope/m",
        "test.TinyLM",
        "None",
        "-1",
        "1",
        "99999999999999999999",
        "-replicas=-3",
        "-replicas=x",
        "--replicas=2",
        "-extra=temperature:nan",
        "-extra=temperature:0.2,stop:'\\n'",
        "-extra=seed:-1",
        "-extra=:",
        "-extra=per_example_max_decode_steps:1e99",
        "-n=-5",
        "-sax_timeout=0",
        "-sax_timeout=1x",
        "-sax_timeout=5s",
        "--json",
        "-stream=maybe",
        "-stream",
        "BATCH_SIZE=[1,",
        "NO_SUCH=1",
        "--max_updates=1",
        "-",
        "",
    ]
) | st.text(max_size=15)


def _saxutil(env: Env, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main.main(["--sax_root", env.root, "--sax_timeout", "10s", *argv])
    return rc, out.getvalue(), err.getvalue()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(command=st.sampled_from(_COMMANDS), args=st.lists(_ARG, max_size=5))
def test_saxutil_arguments_give_one_line(env: Env, command: str, args: list[str]) -> None:
    args = [a for a in args if a != "-"]  # "-" would read the prompt from stdin
    if command == "watch":  # runs until Ctrl-C without a bound
        args = ["--max_updates=1", *args]
    argv = [command, *args]
    rc, out, err = _saxutil(env, argv)
    TALLY.code(f"saxutil {argv}", grpc.StatusCode.INTERNAL if "unexpected error" in err else None)
    assert rc in (0, 1, 2), (argv, rc, err)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    assert "unexpected error" not in err, (argv, err)
    if rc != 0 and not err.startswith("usage:"):
        assert len(err.strip().splitlines()) == 1, (argv, err)
    assert "INTERNAL" not in err, (argv, err)
    # Whatever the command did, the cell is as it was: only the tiny model, still answering.
    for model_id in _published(env):
        if model_id != TINY:
            env.admin_stub.Unpublish(admin_pb2.UnpublishRequest(model_id=model_id), timeout=30)
    if TINY not in _published(env):
        _republish_tiny(env)
    _restore_tiny_replicas(env)
    _good_generate(env, TINY)


def _republish_tiny(env: Env) -> None:
    env.admin_stub.Publish(
        admin_pb2.PublishRequest(
            model=admin_pb2.Model(
                model_id=TINY,
                model_path="test.TinyLM",
                checkpoint_path="None",
                requested_num_replicas=1,
            )
        ),
        timeout=30,
    )


def _restore_tiny_replicas(env: Env) -> None:
    listed = env.admin_stub.List(admin_pb2.ListRequest(model_id=TINY), timeout=10)
    model = listed.published_models[0].model
    if model.requested_num_replicas != 1 or model.checkpoint_path != "None":
        fixed = admin_pb2.Model()
        fixed.CopyFrom(model)
        fixed.requested_num_replicas = 1
        fixed.checkpoint_path = "None"
        env.admin_stub.Update(admin_pb2.UpdateRequest(model=fixed), timeout=30)
    env.admin_stub.WaitForReady(
        admin_pb2.WaitForReadyRequest(model_id=TINY, num_replicas=1), timeout=60
    )
    # A client cache may briefly point at a replica that is gone: wait until the admin lists one.
    wait_for(lambda: listed_ready(env), timeout=60, what="a ready tiny replica")


def listed_ready(env: Env) -> bool:
    listed = env.admin_stub.List(admin_pb2.ListRequest(model_id=TINY), timeout=10)
    return bool(listed.published_models[0].modelet_addresses)
