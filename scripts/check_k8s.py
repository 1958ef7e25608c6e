"""Checks of the Kubernetes manifests: every overlay of deploy/k8s rendered (render_k8s.py) and
validated offline against the schemas of a pinned Kubernetes version (kubernetes-validate,
strict: unknown fields are errors), then the cell's own rules: the servers' flags parse with
their real parsers, probes on the served port (gRPC health where it means what the probe asks),
a drain that fits the termination grace period, PodDisruptionBudgets, Workload Identity, TPU and
GPU resources that match the flags, pod IPs advertised, Prometheus annotations that match
--metrics_port, admins whose standbys (never Ready) neither block rollouts nor evictions, and
multi-process (multi-host) model servers whose pods form one server: a StatefulSet of
--jax_num_processes pods started in parallel, the pod index as --jax_process_id, process 0 named
by a headless Service as --jax_coordinator, and probes that ask process 0's gRPC health from
every pod (the other processes open no port).

    python scripts/check_k8s.py [OVERLAY ...]     # default: every overlay of deploy/k8s/overlays
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
from deploy_files import DEPLOY, IMAGES, REPO, flag, image_name, parse_dockerfile, rel
from deploy_flags import check_argv
from render_k8s import RenderError, render

from sax.health_probe import parser as health_probe_parser
from servables import platform

# The Kubernetes version the manifests are validated against (GKE's regular channel).
K8S_VERSION = "1.34"
OVERLAYS = DEPLOY / "k8s" / "overlays"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
WI_ANNOTATION = "iam.gke.io/gcp-service-account"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
POD_INDEX_FIELD = f"metadata.labels['{POD_INDEX_LABEL}']"
# Values the downward API gives at run time, for checking flags that use them.
FIELD_PLACEHOLDERS = {
    "status.podIP": "10.0.0.1",
    "metadata.name": "pod-0",
    POD_INDEX_FIELD: "0",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def check_overlay(overlay: Path) -> list[str]:
    """Problems of one overlay (empty: it renders, validates and follows the rules)."""
    where = rel(overlay)
    try:
        objects = render(overlay)
    except (RenderError, OSError, ValueError) as e:
        return [f"{where}: {e}"]
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        kind, name = obj.get("kind", "?"), obj.get("metadata", {}).get("name", "?")
        if (kind, name) in seen:
            problems.append(f"{where}: {kind}/{name} is defined twice")
        seen.add((kind, name))
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            problems.append(f"{where}: {kind}/{name}: {path}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError):
            problems.append(f"{where}: {kind}/{name}: no schema for {obj.get('apiVersion')}")
    for obj in objects:
        if obj.get("kind") in WORKLOAD_KINDS:
            problems.extend(_check_workload(obj, objects, where))
        elif obj.get("kind") == "Service":
            problems.extend(_check_service(obj, objects, where))
    return problems


def check_all() -> list[str]:
    """Problems of every overlay under deploy/k8s/overlays."""
    overlays = sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())
    if not overlays:
        return [f"{rel(OVERLAYS)}: no overlays"]
    return [p for overlay in overlays for p in check_overlay(overlay)]


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next(
        (o for o in objects if o.get("kind") == kind and o["metadata"].get("name") == name), None
    )


def _env(
    container: dict[str, Any], objects: list[dict[str, Any]], pod_index: int = 0
) -> dict[str, str]:
    """The container's env as the kubelet sets it (downward API fields: placeholders, the pod
    index `pod_index`)."""
    fields = {**FIELD_PLACEHOLDERS, POD_INDEX_FIELD: str(pod_index)}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = _find(objects, "ConfigMap", ref["name"])
            if cm is not None and ref["key"] in cm.get("data", {}):
                env[var["name"]] = cm["data"][ref["key"]]
        elif "fieldRef" in source:
            env[var["name"]] = fields.get(source["fieldRef"]["fieldPath"], "x")
    return env


def _expand(arg: str, env: dict[str, str], missing: list[str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        if m.group(1) not in env:
            missing.append(m.group(1))
            return m.group(0)
        return env[m.group(1)]

    return re.sub(r"\$\$\([^)]*\)|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def _argv(
    container: dict[str, Any], env: dict[str, str], where: str
) -> tuple[list[str], list[str]]:
    """The command the container runs ($(VAR) expanded as the kubelet does) and problems."""
    name, _ = image_name(container.get("image", ""))
    stage = parse_dockerfile(REPO / IMAGES[name].dockerfile)
    if "command" in container:
        argv = [*container["command"], *container.get("args", [])]
    else:
        argv = [*(stage.entrypoint or []), *container.get("args", stage.cmd or [])]
    missing: list[str] = []
    argv = [_expand(a, env, missing) for a in argv]
    problems = [f"{where}: uses $({m}) but the container has no env {m}" for m in missing]
    return argv, problems


def _probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int | None:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            port = probe[kind].get("port")
            if isinstance(port, str):
                named = [p for p in container.get("ports", []) if p.get("name") == port]
                return named[0]["containerPort"] if named else None
            return port
    return None


def _check_workload(obj: dict[str, Any], objects: list[dict[str, Any]], where: str) -> list[str]:
    problems: list[str] = []
    name = obj["metadata"]["name"]
    pod = obj["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"].get("labels", {})
    here = f"{where}: {obj['kind']}/{name}"
    sa = _find(objects, "ServiceAccount", spec.get("serviceAccountName", "default"))
    if sa is None or WI_ANNOTATION not in sa["metadata"].get("annotations", {}):
        problems.append(f"{here}: runs as a ServiceAccount without {WI_ANNOTATION}")
    containers = [(c, False) for c in spec.get("containers", [])]
    containers += [(c, True) for c in spec.get("initContainers", [])]
    for container, init in containers:
        image, tag = image_name(container.get("image", ""))
        where_c = f"{here}: container {container['name']}"
        if image not in IMAGES:
            problems.append(
                f"{where_c}: image {container.get('image')} is not one of {list(IMAGES)}"
            )
            continue
        if tag in ("", "latest") and "@" not in container["image"]:
            problems.append(f"{where_c}: image {container['image']} needs a tag or a digest")
        env = _env(container, objects)
        argv, argv_problems = _argv(container, env, where_c)
        problems += argv_problems + check_argv(argv, env, where_c)
        if init:
            continue
        module = argv[2] if len(argv) > 2 else ""
        if module not in ("admin_server", "model_server", "gateway"):
            continue
        root = IMAGES[image].root
        security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        if not root and security.get("runAsNonRoot") is not True:
            problems.append(f"{where_c}: set runAsNonRoot: true (the image runs as uid 10001)")
        port = int(flag(argv, "port") or 0)
        multihost = module == "model_server" and int(flag(argv, "jax_num_processes") or 1) > 1
        if multihost:
            problems += _check_multihost(obj, objects, container, argv, where_c)
        for probe in () if multihost else PROBES:
            # A standby admin's health is NOT_SERVING: gRPC startup or liveness probes would
            # restart it; its readiness (the leader only) is the gRPC health.
            tcp = module == "admin_server" and probe != "readinessProbe"
            if probe not in container:
                problems.append(f"{where_c}: no {probe}")
            elif tcp and container[probe].get("tcpSocket", {}).get("port") != port:
                problems.append(
                    f"{where_c}: {probe} must be a tcpSocket probe on --port={port} (a standby "
                    "admin answers NOT_SERVING on gRPC health and would be restarted)"
                )
            elif (
                not tcp
                and module != "gateway"
                and (container[probe].get("grpc", {}).get("port") != port)
            ):
                problems.append(f"{where_c}: {probe} must be a grpc probe on --port={port}")
            elif _probe_port(container[probe], container) != port:
                problems.append(f"{where_c}: {probe} does not probe --port={port}")
        if module in ("model_server", "gateway") and not _has_pdb(objects, labels):
            problems.append(f"{here}: no PodDisruptionBudget selects its pods")
        if module in ("admin_server", "model_server"):
            problems += _check_pod_ip(container, where_c)
            problems += _check_metrics(obj, objects, container, argv, where_c)
        if module == "admin_server":
            problems += _check_admin(obj, objects, labels, here)
        if module == "model_server":
            problems += _check_model_server(obj, container, argv, env, where_c)
    return problems


def _check_pod_ip(container: dict[str, Any], where: str) -> list[str]:
    """The server advertises its own pod IP (the admin writes it into the location record)."""
    advertise = next((a for a in container.get("args", []) if "--advertise_host" in a), "")
    pod_ip = [
        v["name"]
        for v in container.get("env", [])
        if v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP"
    ]
    if not pod_ip or advertise != f"--advertise_host=$({pod_ip[0]})":
        return [f"{where}: pass --advertise_host=$(POD_IP) with POD_IP from status.podIP"]
    return []


def _check_metrics(
    obj: dict[str, Any],
    objects: list[dict[str, Any]],
    container: dict[str, Any],
    argv: list[str],
    where: str,
) -> list[str]:
    """--metrics_port, the container's `metrics` port and the prometheus.io annotations agree.
    Only process 0 of a multi-process server serves metrics: a Service that selects pod index 0
    carries the annotations instead of the pods."""
    metrics = int(flag(argv, "metrics_port") or 0)
    pod = obj["spec"]["template"]
    notes = pod["metadata"].get("annotations", {})
    scraped = notes.get("prometheus.io/scrape") == "true"
    multihost = int(flag(argv, "jax_num_processes") or 1) > 1
    if not metrics:
        return [f"{where}: prometheus.io/scrape without --metrics_port"] if scraped else []
    problems = []
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    if ports.get("metrics") != metrics:
        problems.append(f"{where}: name its --metrics_port {metrics} `metrics` under ports")
    if multihost:
        if scraped:
            problems.append(
                f"{where}: no prometheus.io/scrape on the pods of a multi-process server (only "
                "process 0 serves metrics); annotate a Service that selects pod index 0"
            )
        if not any(_scrapes_process_0(o, obj, metrics) for o in objects):
            problems.append(
                f'{where}: add a Service selecting {POD_INDEX_LABEL}: "0" with a port targeting '
                f'`metrics` and prometheus.io/scrape: "true", prometheus.io/port: "{metrics}"'
            )
        return problems
    if not scraped or notes.get("prometheus.io/port") != str(metrics):
        problems.append(
            f'{where}: annotate the pod prometheus.io/scrape: "true" and prometheus.io/port: '
            f'"{metrics}" (its --metrics_port)'
        )
    return problems


def _pod_labels(obj: dict[str, Any], index: int) -> dict[str, str]:
    """The labels of pod `index` of a workload (a StatefulSet's pods also get their index)."""
    labels = dict(obj["spec"]["template"]["metadata"].get("labels", {}))
    if obj["kind"] == "StatefulSet":
        labels[POD_INDEX_LABEL] = str(index)
    return labels


def _selects(service: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = service["spec"].get("selector", {})
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _scrapes_process_0(service: dict[str, Any], obj: dict[str, Any], metrics: int) -> bool:
    """`service` selects pod 0 of `obj` only and is annotated to scrape its metrics port."""
    if service.get("kind") != "Service":
        return False
    notes = service["metadata"].get("annotations", {})
    replicas = int(obj["spec"].get("replicas", 1))
    return (
        _selects(service, _pod_labels(obj, 0))
        and not any(_selects(service, _pod_labels(obj, i)) for i in range(1, replicas))
        and notes.get("prometheus.io/scrape") == "true"
        and notes.get("prometheus.io/port") == str(metrics)
        and any(p.get("targetPort") in ("metrics", metrics) for p in service["spec"]["ports"])
    )


def _check_admin(
    obj: dict[str, Any], objects: list[dict[str, Any]], labels: dict[str, str], where: str
) -> list[str]:
    """Only the leading admin is Ready: a rollout that waits for Ready pods never replaces
    it, and a PodDisruptionBudget would never let it be evicted."""
    problems = []
    replicas = int(obj["spec"].get("replicas", 1))
    strategy = obj["spec"].get("strategy", {})
    if obj["kind"] != "Deployment":
        problems.append(f"{where}: run the admins as a Deployment")
    elif replicas > 1 and strategy.get("type", "RollingUpdate") == "RollingUpdate":
        unavailable = str(strategy.get("rollingUpdate", {}).get("maxUnavailable", "25%"))
        if unavailable not in ("100%", str(replicas)):
            problems.append(
                f"{where}: rollingUpdate.maxUnavailable must be 100% (only the leader is ever "
                "Ready, so a rollout waiting for Ready pods would never replace it)"
            )
    if _has_pdb(objects, labels):
        problems.append(
            f"{where}: no PodDisruptionBudget for the admins (the standby is never Ready, so a "
            "budget would forbid evicting the leader)"
        )
    return problems


def _has_pdb(objects: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    for o in objects:
        if o.get("kind") == "PodDisruptionBudget":
            match = o["spec"].get("selector", {}).get("matchLabels", {})
            if match and all(labels.get(k) == v for k, v in match.items()):
                return True
    return False


def _check_model_server(
    obj: dict[str, Any], container: dict[str, Any], argv: list[str], env: dict[str, str], where: str
) -> list[str]:
    problems: list[str] = []
    spec = obj["spec"]["template"]["spec"]
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        problems.append(f"{where}: no preStop hook")
    sleep = float((pre_stop or {}).get("sleep", {}).get("seconds", 0))
    grace = float(flag(argv, "shutdown_grace_s") or 10.0)
    period = float(spec.get("terminationGracePeriodSeconds", 30))
    if period <= sleep + grace:
        problems.append(
            f"{where}: terminationGracePeriodSeconds {period:g} must exceed preStop {sleep:g} s "
            f"+ --shutdown_grace_s {grace:g} s"
        )
    chip = flag(argv, "platform_chip") or "cpu"
    topology = flag(argv, "platform_topology") or "1"
    limits = container.get("resources", {}).get("limits", {})
    devices = platform.num_devices(topology)
    if chip in platform.TPU_CHIPS:
        selector = spec.get("nodeSelector", {})
        if selector.get("cloud.google.com/gke-tpu-topology") != topology:
            problems.append(f"{where}: nodeSelector gke-tpu-topology must be {topology}")
        if "cloud.google.com/gke-tpu-accelerator" not in selector:
            problems.append(f"{where}: no nodeSelector cloud.google.com/gke-tpu-accelerator")
        hosts = int(obj["spec"].get("replicas", 1)) if obj["kind"] == "StatefulSet" else 1
        chips = int(limits.get("google.com/tpu", 0))
        if chips * hosts != devices:
            problems.append(
                f"{where}: {hosts} host(s) x google.com/tpu {chips} is not the {devices} chips "
                f"of {topology}"
            )
        if hosts > 1 and len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) != hosts:
            problems.append(f"{where}: TPU_WORKER_HOSTNAMES must name all {hosts} hosts")
        if hosts > 1 and int(flag(argv, "jax_num_processes") or 1) != hosts:
            problems.append(
                f"{where}: a slice of {hosts} hosts is one server of {hosts} processes: pass "
                f"--jax_num_processes={hosts} and the multi-process flags (docs/jax.md)"
            )
    elif chip in platform.GPU_CHIPS and int(limits.get("nvidia.com/gpu", 0)) != devices:
        problems.append(f"{where}: nvidia.com/gpu limit must be {devices} (--platform_topology)")
    return problems


def _check_service(obj: dict[str, Any], objects: list[dict[str, Any]], where: str) -> list[str]:
    here = f"{where}: Service/{obj['metadata']['name']}"
    selector = obj["spec"].get("selector", {})
    pods = [
        o["spec"]["template"]
        for o in objects
        if o.get("kind") in WORKLOAD_KINDS
        and any(_selects(obj, _pod_labels(o, i)) for i in range(int(o["spec"].get("replicas", 1))))
    ]
    if not selector or not pods:
        return [f"{here}: its selector {selector} matches no pods"]
    ports = {
        p.get("name"): p["containerPort"]
        for pod in pods
        for c in pod["spec"]["containers"]
        for p in c.get("ports", [])
    }
    return [
        f"{here}: targetPort {p.get('targetPort')} is not a port of its pods"
        for p in obj["spec"].get("ports", [])
        if p.get("targetPort", p["port"]) not in {*ports, *ports.values()}
    ]


# ------------------------------------------------------------------ multi-process model servers

# Stands in for python when a probe's command is run to see what it would ask: prints its
# arguments, one a line, after a marker line.
_FAKE_PYTHON = '#!/bin/sh\necho "@@python"\nfor a in "$@"; do echo "$a"; done\n'


def _check_multihost(
    obj: dict[str, Any],
    objects: list[dict[str, Any]],
    container: dict[str, Any],
    argv: list[str],
    where: str,
) -> list[str]:
    """The pods of a multi-process server form one server (docs/jax.md): a StatefulSet of
    --jax_num_processes pods started in parallel, each with its pod index as --jax_process_id,
    --jax_coordinator naming pod 0 through a headless Service that publishes pods before they
    are ready, the JAX backend, flags that parse on every pod, and probes of process 0's gRPC
    health on every pod."""
    here = f"{where} (multi-process)"
    processes = int(flag(argv, "jax_num_processes") or 1)
    spec = obj["spec"]
    if obj["kind"] != "StatefulSet":
        return [f"{here}: run it as a StatefulSet of {processes} pods (pod index = process id)"]
    problems: list[str] = []
    replicas = int(spec.get("replicas", 1))
    if replicas != processes:
        problems.append(
            f"{here}: replicas {replicas} must equal --jax_num_processes={processes} (one pod "
            "per process)"
        )
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append(
            f"{here}: set podManagementPolicy: Parallel (process 0 is Ready only once the others "
            "have connected, so an ordered start never gets past pod 0)"
        )
    chip = flag(argv, "platform_chip") or "cpu"
    backend = flag(argv, "backend") or ("jax" if chip in platform.TPU_CHIPS else "torch")
    if backend != "jax":
        problems.append(f"{here}: pass --backend=jax (multi-process serving is the JAX backend)")
    index_vars = {
        v["name"]
        for v in container.get("env", [])
        if v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == POD_INDEX_FIELD
    }
    raw = [a for a in container.get("args", []) if a.startswith("--jax_process_id")]
    if not raw or raw[-1] not in {f"--jax_process_id=$({v})" for v in index_vars}:
        problems.append(
            f"{here}: pass --jax_process_id=$(JAX_PROCESS_ID) with JAX_PROCESS_ID from the "
            f"downward API ({POD_INDEX_FIELD})"
        )
    worker_id = next((v for v in container.get("env", []) if v["name"] == "TPU_WORKER_ID"), None)
    if worker_id is not None and worker_id.get("name") not in index_vars:
        problems.append(f"{here}: TPU_WORKER_ID must be the pod index, as --jax_process_id")
    problems += _check_coordinator(obj, objects, argv, here)
    # The flags of every pod parse (each has its own process id).
    for index in range(1, replicas):
        env = _env(container, objects, index)
        pod_argv, _ = _argv(container, env, here)
        problems += check_argv(pod_argv, env, f"{here}: pod {index}")
    problems += _check_multihost_probes(obj, objects, container, argv, here)
    return problems


def _check_coordinator(
    obj: dict[str, Any], objects: list[dict[str, Any]], argv: list[str], where: str
) -> list[str]:
    """--jax_coordinator is pod 0's stable name (<statefulset>-0.<headless service>), published
    before the pods are ready."""
    name, service_name = obj["metadata"]["name"], obj["spec"].get("serviceName", "")
    host = (flag(argv, "jax_coordinator") or "").rpartition(":")[0]
    expected = f"{name}-0.{service_name}"
    problems = []
    if host != expected and not host.startswith(f"{expected}."):
        problems.append(f"{where}: --jax_coordinator must be pod 0's stable name {expected}:PORT")
    service = _find(objects, "Service", service_name)
    if (
        service is None
        or service["spec"].get("clusterIP") != "None"
        or service["spec"].get("publishNotReadyAddresses") is not True
        or not _selects(service, _pod_labels(obj, 0))
    ):
        problems.append(
            f"{where}: serviceName {service_name!r} must be a headless Service (clusterIP: None) "
            "with publishNotReadyAddresses: true selecting the pods, so that the others find pod "
            "0 before it is ready"
        )
    return problems


def _probe_commands(command: list[str], env: dict[str, str]) -> list[list[str]]:
    """The python command lines an exec probe's command runs with `env` (each without "python"),
    found by running it with a stand-in python that only prints its arguments."""
    with tempfile.TemporaryDirectory() as tmp:
        for exe in ("python", "python3"):
            fake = Path(tmp) / exe
            fake.write_text(_FAKE_PYTHON)
            fake.chmod(0o755)
        (Path(tmp) / "sh").symlink_to("/bin/sh")
        try:
            out = subprocess.run(
                command,
                env={**env, "PATH": tmp},
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
    runs = out.split("@@python\n")[1:]
    return [run.splitlines() for run in runs]


def _check_multihost_probes(
    obj: dict[str, Any],
    objects: list[dict[str, Any]],
    container: dict[str, Any],
    argv: list[str],
    where: str,
) -> list[str]:
    """Only process 0 listens (gRPC on --port): each probe is an exec probe that asks process
    0's gRPC health, on 127.0.0.1 (or its stable name) from pod 0 and through the coordinator's
    host from the other pods; liveness outlasts process 0's drain."""
    problems: list[str] = []
    port = int(flag(argv, "port") or 0)
    coordinator = (flag(argv, "jax_coordinator") or "").rpartition(":")[0]
    replicas = int(obj["spec"].get("replicas", 1))
    for probe in PROBES:
        command = container.get(probe, {}).get("exec", {}).get("command")
        if not command:
            problems.append(
                f"{where}: {probe} must be an exec probe of process 0's gRPC health (python -m "
                f"sax.health_probe HOST:{port}): the other processes open no port"
            )
            continue
        for index in range(replicas):
            hosts = {coordinator, "127.0.0.1", "localhost"} if index == 0 else {coordinator}
            runs = _probe_commands(command, _env(container, objects, index))
            asked = [r for r in runs if r[:2] == ["-m", "sax.health_probe"]]
            if len(asked) != 1 or check_argv(["python", *asked[0]], {}, ""):
                problems.append(
                    f"{where}: {probe} on pod {index} must run python -m sax.health_probe once "
                    f"(it runs {[shlex.join(r) for r in runs]})"
                )
                continue
            target = health_probe_parser().parse_args(asked[0][2:]).target
            host, _, target_port = target.rpartition(":")
            if host not in hosts or target_port != str(port):
                problems.append(
                    f"{where}: {probe} on pod {index} asks {target}, not process 0's gRPC health "
                    f"({' or '.join(sorted(h + ':' + str(port) for h in hosts))})"
                )
    live = container.get("livenessProbe", {})
    window = int(live.get("periodSeconds", 10)) * int(live.get("failureThreshold", 3))
    sleep = float(
        container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    )
    drain = sleep + float(flag(argv, "shutdown_grace_s") or 10.0)
    if live and window <= drain:
        problems.append(
            f"{where}: livenessProbe periodSeconds x failureThreshold ({window} s) must exceed "
            f"process 0's drain (preStop {sleep:g} s + --shutdown_grace_s), {drain:g} s, so the "
            "other processes outlive it"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    """Checks the overlays named (default: all); one line per problem; 1 if there is any."""
    parser = argparse.ArgumentParser(
        prog="python scripts/check_k8s.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overlays", nargs="*", type=Path, help="kustomization folders")
    args = parser.parse_args(argv)
    if args.overlays:
        problems = [p for overlay in args.overlays for p in check_overlay(overlay)]
    else:
        problems = check_all()
    for line in problems:
        print(line)
    if not problems:
        print("kubernetes manifests: all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
