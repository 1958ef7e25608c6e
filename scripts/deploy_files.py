"""Reads the deployment files: the images' Dockerfiles and the compose files.

Shared by scripts/check_deploy.py and tests/deploy, which run the images' and the compose
services' command lines outside Docker.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILES = ("compose.yaml", "compose.gcs.yaml")


@dataclass(frozen=True)
class Image:
    """One image of deploy/docker: its name, Dockerfile and the module its entry point runs."""

    name: str
    dockerfile: str
    module: str
    # The TPU image runs as root (the TPU devices belong to root).
    root: bool = False


IMAGES: dict[str, Image] = {
    i.name: i
    for i in (
        Image("sax-admin-server", "deploy/docker/admin-server.Dockerfile", "admin_server"),
        Image("sax-model-server-cpu", "deploy/docker/model-server-cpu.Dockerfile", "model_server"),
        Image(
            "sax-model-server-cuda", "deploy/docker/model-server-cuda.Dockerfile", "model_server"
        ),
        Image(
            "sax-model-server-tpu",
            "deploy/docker/model-server-tpu.Dockerfile",
            "model_server",
            root=True,
        ),
        Image("sax-gateway", "deploy/docker/gateway.Dockerfile", "gateway"),
    )
}


def rel(path: Path) -> str:
    """`path` relative to the repository when inside it (for messages), else as given."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def image_name(ref: str) -> tuple[str, str]:
    """ "registry/path/sax-gateway:0.1.0" -> ("sax-gateway", "0.1.0"); tag "" when none."""
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    name, _, tag = last.partition(":")
    return name, tag


@dataclass
class Stage:
    """What one stage of a Dockerfile sets (inherited from the stage it is built FROM)."""

    base: str
    name: str = ""
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    healthcheck: list[str] | None = None
    user: str = ""
    expose: list[int] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out: list[tuple[int, str, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def _exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed) else None


def parse_dockerfile(path: Path) -> Stage:
    """The final stage of the Dockerfile at `path`, with what it inherits from earlier stages.
    Shell-form ENTRYPOINT, CMD and HEALTHCHECK are reported in `errors` (signals must reach
    the server, and the commands must be checkable)."""
    stages: dict[str, Stage] = {}
    global_args: dict[str, str] = {}
    stage: Stage | None = None
    for n, word, rest in instructions(path.read_text()):
        where = f"{rel(path)}:{n}"
        if word == "ARG" and stage is None:
            key, _, default = rest.partition("=")
            global_args[key] = default
        elif word == "FROM":
            parts = rest.split()
            base = parts[0]
            parent = stages.get(base)
            stage = Stage(base=base) if parent is None else _inherit(parent)
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stage.name = parts[2]
                stages[parts[2]] = stage
            stage.args = dict(global_args)
        elif stage is None:
            continue
        elif word in ("ENTRYPOINT", "CMD"):
            argv = _exec_form(rest)
            if argv is None:
                stage.errors.append(f"{where}: {word} must be in exec (JSON) form")
            setattr(stage, word.lower(), argv)
            if word == "ENTRYPOINT":
                stage.cmd = None  # as Docker does: a new ENTRYPOINT resets an inherited CMD
        elif word == "HEALTHCHECK":
            body = re.sub(r"^(--\S+\s+)*", "", rest)
            if body.upper().startswith("CMD "):
                argv = _exec_form(body[4:].strip())
                if argv is None:
                    stage.errors.append(f"{where}: HEALTHCHECK CMD must be in exec (JSON) form")
                stage.healthcheck = argv
        elif word == "USER":
            stage.user = rest
        elif word == "EXPOSE":
            stage.expose.extend(int(p.split("/")[0]) for p in rest.split())
        elif word == "ARG":
            key, _, default = rest.partition("=")
            stage.args[key] = default or global_args.get(key, "")
        elif word == "COPY":
            args = shlex.split(rest)
            if not any(a.startswith("--from") for a in args):
                stage.copies.extend(a for a in args[:-1] if not a.startswith("--"))
    if stage is None:
        raise ValueError(f"{path}: no FROM")
    return stage


def _inherit(parent: Stage) -> Stage:
    return Stage(
        base=parent.base,
        entrypoint=parent.entrypoint,
        cmd=parent.cmd,
        healthcheck=parent.healthcheck,
        user=parent.user,
        expose=list(parent.expose),
    )


def image_argv(image: Image) -> list[str]:
    """ENTRYPOINT + CMD of the image's Dockerfile: the command `docker run IMAGE` runs."""
    stage = parse_dockerfile(REPO / image.dockerfile)
    return [*(stage.entrypoint or []), *(stage.cmd or [])]


_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


def interpolate(value: Any, variables: dict[str, str], missing: list[str]) -> Any:
    """Compose's variable interpolation on every string of `value`: $VAR, ${VAR}, ${VAR:-x},
    ${VAR-x}, ${VAR:?msg}, ${VAR?msg}, $$. Variables that must be set and are not go to
    `missing`; unset ones without a default become ""."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables, missing) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op") or "", m.group("arg") or ""
        val = variables.get(name)
        unset = val is None or (op.startswith(":") and val == "")
        if unset and op.endswith("-"):
            return arg
        if unset and op.endswith("?"):
            missing.append(f"{name} ({arg})" if arg else name)
            return ""
        return val or ""

    return _VAR.sub(sub, value)


def load_compose(path: Path, variables: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The compose file after interpolation, and the required variables left unset."""
    missing: list[str] = []
    data = interpolate(yaml.safe_load(path.read_text()) or {}, variables, missing)
    return data, missing


def as_argv(value: Any) -> list[str] | None:
    """A compose `command` or `entrypoint` (a list, or a string split as a shell would)."""
    if value is None:
        return None
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's `environment` (a map or a list of KEY=VALUE) as a dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def service_argv(service: dict[str, Any]) -> list[str]:
    """The command a compose service runs: its entrypoint (or the image's) and its command (or,
    when the entrypoint is the image's, the image's CMD)."""
    name, _ = image_name(service.get("image", ""))
    stage = parse_dockerfile(REPO / IMAGES[name].dockerfile) if name in IMAGES else None
    entrypoint = as_argv(service.get("entrypoint"))
    command = as_argv(service.get("command"))
    if entrypoint is None:
        entrypoint = (stage.entrypoint if stage else None) or []
        if command is None:
            command = (stage.cmd if stage else None) or []
    return [*entrypoint, *(command or [])]


def parse_duration(value: str | int | float) -> float:
    """Compose durations ("30s", "1m30s", "500ms", 10) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def flag(argv: list[str], name: str) -> str | None:
    """The value of --name (as --name=V or --name V) in argv; the last one wins."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value
