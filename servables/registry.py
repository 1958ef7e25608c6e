"""The servable config registry: configs found by dotted name, e.g. "test.TinyLM".

`@register` on a `ServableConfig` subclass registers an instance under
"<module's last part>.<class name>", as Saxml's `servable_model_registry.register`. Every module
of the `servables.configs` package is imported on first use, so a new family is a new module
there.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from sax.errors import NotFoundError
from servables.servable_config import ServableConfig

_REGISTRY: dict[str, ServableConfig] = {}
# The package whose modules register configs, imported on first use (import-light).
_CONFIGS_PACKAGE = "servables.configs"
_loaded = False

C = TypeVar("C", bound=type[ServableConfig])


def register(cls: C) -> C:
    """Class decorator: registers an instance of cls under "<module>.<ClassName>"."""
    name = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
    config = cls()
    config.validate()
    _REGISTRY[name] = config
    return cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        package = importlib.import_module(_CONFIGS_PACKAGE)
        for module in pkgutil.iter_modules(package.__path__, f"{_CONFIGS_PACKAGE}."):
            importlib.import_module(module.name)
        _loaded = True


def get(name: str) -> ServableConfig:
    """The config registered under name; NOT_FOUND listing the known names otherwise."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotFoundError(
            f"unknown servable config {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    """Every registered config name, sorted."""
    _load_all()
    return sorted(_REGISTRY)
