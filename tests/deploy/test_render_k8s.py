"""scripts/render_k8s.py: the subset of kustomize that deploy/k8s uses."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from render_k8s import RenderError, main, render, split_image, strategic_merge

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  template:
    spec:
      nodeSelector: {pool: a}
      containers:
        - name: app
          image: app:1.0
          args: [--a, --b]
          env: [{name: X, value: "1"}, {name: Y, value: "2"}]
          securityContext: {runAsNonRoot: true, capabilities: {drop: [ALL]}}
        - name: sidecar
          image: reg.example/side:2
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
"""


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def _base(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "base",
        {"kustomization.yaml": "resources: [web.yaml]\n", "web.yaml": DEPLOYMENT},
    )


def _by_kind(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


def test_resources_of_files_and_folders_in_order(tmp_path: Path) -> None:
    _base(tmp_path)
    overlay = _write(
        tmp_path / "overlay",
        {
            "kustomization.yaml": "resources: [../base, extra.yaml]\n",
            "extra.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        },
    )
    assert [o["kind"] for o in render(overlay)] == ["Deployment", "Service", "ConfigMap"]


def test_strategic_merge_patch(tmp_path: Path) -> None:
    _base(tmp_path)
    patch = """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          template:
            spec:
              nodeSelector: {gpu: "yes"}
              containers:
                - name: app
                  args: [--c]
                  env: [{name: Y, value: "3"}, {name: Z, value: "4"}]
                  securityContext: {capabilities: null}
        """
    overlay = _write(
        tmp_path / "overlay",
        {
            "kustomization.yaml": "resources: [../base]\npatches: [{path: p.yaml}]\n",
            "p.yaml": patch,
        },
    )
    pod = _by_kind(render(overlay), "Deployment")["spec"]["template"]["spec"]
    app, sidecar = pod["containers"]
    assert pod["nodeSelector"] == {"pool": "a", "gpu": "yes"}  # maps merge
    assert app["args"] == ["--c"]  # plain lists are replaced
    assert app["env"] == [  # keyed lists merge by name
        {"name": "X", "value": "1"},
        {"name": "Y", "value": "3"},
        {"name": "Z", "value": "4"},
    ]
    assert app["securityContext"] == {"runAsNonRoot": True}  # null deletes
    assert sidecar["image"] == "reg.example/side:2"


def test_json6902_patch_on_its_target(tmp_path: Path) -> None:
    _base(tmp_path)
    kustomization = """
        resources: [../base]
        patches:
          - target: {kind: Deployment, name: web}
            patch: |-
              - {op: replace, path: /spec/replicas, value: 3}
              - {op: add, path: /spec/template/spec/containers/0/args/-, value: --z}
              - {op: remove, path: /spec/template/spec/containers/1}
              - {op: add, path: /spec/template/spec/nodeSelector/google.com~1tpu, value: "4"}
        """
    overlay = _write(tmp_path / "overlay", {"kustomization.yaml": kustomization})
    deployment = _by_kind(render(overlay), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert [c["name"] for c in pod["containers"]] == ["app"]
    assert pod["containers"][0]["args"] == ["--a", "--b", "--z"]
    assert pod["nodeSelector"] == {"pool": "a", "google.com/tpu": "4"}


def test_images(tmp_path: Path) -> None:
    _base(tmp_path)
    kustomization = """
        resources: [../base]
        images:
          - {name: app, newName: reg.example/team/app, newTag: "2.0"}
          - {name: reg.example/side, digest: "sha256:abc"}
        """
    overlay = _write(tmp_path / "overlay", {"kustomization.yaml": kustomization})
    containers = _by_kind(render(overlay), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == [
        "reg.example/team/app:2.0",
        "reg.example/side@sha256:abc",
    ]


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        (
            "resources: [../base]\nnamespace: x\n",
            "fields not supported by this renderer: ['namespace']",
        ),
        ("resources: [missing.yaml]\n", "resource 'missing.yaml' does not exist"),
        (
            "resources: [../base]\n"
            'patches: [{patch: "kind: Deployment\\nmetadata: {name: nope}"}]\n',
            "matches no object",
        ),
        (
            "resources: [../base]\npatches:\n  - target: {kind: Service}\n"
            "    patch: '[{op: replace, path: /spec/nothing/here, value: 1}]'\n",
            "JSON 6902 path /spec/nothing/here not found",
        ),
    ],
)
def test_what_it_cannot_render_is_an_error(
    tmp_path: Path, kustomization: str, message: str
) -> None:
    _base(tmp_path)
    overlay = _write(tmp_path / "overlay", {"kustomization.yaml": kustomization})
    with pytest.raises(RenderError, match=re.escape(message)):
        render(overlay)


def test_split_image() -> None:
    assert split_image("reg:5000/a/b:1.2") == ("reg:5000/a/b", "1.2")
    assert split_image("reg:5000/a/b") == ("reg:5000/a/b", "")
    assert split_image("b") == ("b", "")


def test_command_line_prints_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(_base(tmp_path))]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "no kustomization.yaml" in capsys.readouterr().err


def test_strategic_merge_leaves_its_inputs_alone() -> None:
    base = {"a": {"b": [1]}, "containers": [{"name": "x", "v": 1}]}
    patch = {"a": {"c": 2}, "containers": [{"name": "x", "v": 2}]}
    assert strategic_merge(base, patch) == {
        "a": {"b": [1], "c": 2},
        "containers": [{"name": "x", "v": 2}],
    }
    assert base == {"a": {"b": [1]}, "containers": [{"name": "x", "v": 1}]}
