"""Renders a kustomization (deploy/k8s/overlays/*) into plain Kubernetes objects, offline.

    python scripts/render_k8s.py deploy/k8s/overlays/cpu > cpu.yaml

It implements the subset of kustomize that deploy/k8s uses, with kustomize's meaning, so that
`kubectl apply -k` and this script give the same objects:
- `resources`: YAML files (one or more documents) and folders holding a kustomization.yaml,
  in order;
- `images`: `name` with `newName` and/or `newTag` (also `digest`), on containers and
  initContainers of pod templates;
- `patches`: from `path` or inline `patch`. A YAML object is a strategic merge patch on the object
  of its kind and name: maps merge, null deletes a key, lists of containers, initContainers, env,
  volumes (by name), ports (by containerPort) and volumeMounts (by mountPath) merge by key, other
  lists are replaced. A YAML list is a JSON 6902 patch (add, remove, replace) on the objects its
  `target` selects (kind, name, group, version).
Anything else in a kustomization.yaml (generators, namespace, labels, components, replacements)
is refused, with the name of the field.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "resources", "images", "patches"})
# Strategic-merge keys of the lists that deploy/k8s patches; other lists are replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
}


class RenderError(Exception):
    """A kustomization this renderer cannot render; the message names the file and the field."""


def render(path: Path | str) -> list[Obj]:
    """The objects of the kustomization in folder `path`, after its images and patches."""
    root = Path(path)
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{root}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unsupported = sorted(set(spec) - SUPPORTED_FIELDS)
    if unsupported:
        raise RenderError(f"{kfile}: fields not supported by this renderer: {unsupported}")
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        target = (root / entry).resolve()
        if target.is_dir():
            objects.extend(render(target))
        elif target.is_file():
            objects.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
        else:
            raise RenderError(f"{kfile}: resource {entry!r} does not exist")
    for patch in spec.get("patches", []):
        _apply_patch(objects, patch, root, kfile)
    for image in spec.get("images", []):
        _set_image(objects, image)
    return objects


def to_yaml(objects: list[Obj]) -> str:
    """A multi-document YAML stream of the objects."""
    return yaml.safe_dump_all(objects, sort_keys=False)


def _apply_patch(objects: list[Obj], patch: Obj, root: Path, kfile: Path) -> None:
    if "path" in patch:
        text = (root / patch["path"]).read_text()
    elif "patch" in patch:
        text = patch["patch"]
    else:
        raise RenderError(f"{kfile}: a patch needs `path` or `patch`")
    body = yaml.safe_load(text)
    target = patch.get("target")
    if isinstance(body, list):
        if not target:
            raise RenderError(f"{kfile}: a JSON 6902 patch needs a `target`")
        matched = [o for o in objects if _selected(o, target)]
        if not matched:
            raise RenderError(f"{kfile}: patch target {target} matches no object")
        for obj in matched:
            for op in body:
                _json6902(obj, op, kfile)
        return
    if not isinstance(body, dict):
        raise RenderError(f"{kfile}: a patch is a YAML object or a list of operations")
    selector = target or {"kind": body.get("kind"), "name": body.get("metadata", {}).get("name")}
    matched = [o for o in objects if _selected(o, selector)]
    if not matched:
        raise RenderError(f"{kfile}: patch for {selector} matches no object")
    for obj in matched:
        merged = strategic_merge(obj, body)
        obj.clear()
        obj.update(merged)


def _selected(obj: Obj, target: Obj) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    checks = {
        "kind": obj.get("kind"),
        "name": obj.get("metadata", {}).get("name"),
        "group": group,
        "version": version,
    }
    return all(checks[k] == v for k, v in target.items() if k in checks)


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """`patch` merged into a copy of `base` (the subset of strategic merge in the docstring)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    merge_key = MERGE_KEYS.get(key)
    if merge_key and isinstance(base, list) and isinstance(patch, list):
        out_list = copy.deepcopy(base)
        index = {item.get(merge_key): i for i, item in enumerate(out_list)}
        for item in patch:
            i = index.get(item.get(merge_key))
            if i is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[i] = strategic_merge(out_list[i], item)
        return out_list
    return copy.deepcopy(patch)


def _json6902(obj: Obj, op: Obj, kfile: Path) -> None:
    kind, path = op.get("op"), op.get("path", "")
    if kind not in ("add", "remove", "replace") or not path.startswith("/"):
        raise RenderError(f"{kfile}: unsupported JSON 6902 operation {op}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    value = copy.deepcopy(op.get("value"))
    parent: Any = obj
    try:
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            i = len(parent) if last == "-" and kind == "add" else int(last)
            if kind == "add":
                parent.insert(i, value)
            elif kind == "remove":
                del parent[i]
            else:
                parent[i] = value
        else:
            if kind != "add" and last not in parent:
                raise KeyError(last)
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = value
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise RenderError(f"{kfile}: JSON 6902 path {path} not found ({e!r})") from e


def _set_image(objects: list[Obj], image: Obj) -> None:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, tag = split_image(container.get("image", ""))
            if name != image["name"]:
                continue
            new_name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{new_name}@{image['digest']}"
            else:
                container["image"] = f"{new_name}:{image.get('newTag', tag)}"


def split_image(ref: str) -> tuple[str, str]:
    """ "reg/name:tag" -> ("reg/name", "tag"); the tag is "" when there is none."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, ""
    return name, tag


def main(argv: list[str]) -> int:
    """Prints the rendered objects of each kustomization folder given."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        docs = [to_yaml(render(folder)) for folder in argv]
        sys.stdout.write("---\n".join(docs))
    except RenderError as e:
        print(f"render_k8s: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
