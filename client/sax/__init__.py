"""The `sax` client: talk to a cell's admin and model servers (Saxml-style API).

    import sax
    sax.Publish("/sax/test/tiny", "test.TinyLM", "None", 1)
    lm = sax.Model("/sax/test/tiny").LM()
    print(lm.Generate("Hello"))

sax_root comes from $SAX_ROOT unless `sax.SetSaxRoot(path)` is called. Errors are the classes
of `sax.errors`.
"""

from sax import errors
from sax.admin import (
    CloseAll,
    GetPublished,
    List,
    ListAll,
    ListDetail,
    ModelDetail,
    ModelServerTypeStat,
    Publish,
    ReplicaDetail,
    SetSaxRoot,
    Stats,
    StatsDetail,
    Unpublish,
    Update,
    UpdateModel,
    WaitForReady,
)
from sax.lm import LanguageModel
from sax.model import Model
from sax.options import ModelOptions, Options

__all__ = [
    "CloseAll",
    "GetPublished",
    "LanguageModel",
    "List",
    "ListAll",
    "ListDetail",
    "Model",
    "ModelDetail",
    "ModelOptions",
    "ModelServerTypeStat",
    "Options",
    "Publish",
    "ReplicaDetail",
    "SetSaxRoot",
    "Stats",
    "StatsDetail",
    "Unpublish",
    "Update",
    "UpdateModel",
    "WaitForReady",
    "errors",
]
