"""`sax.Model`: a handle on a published model (Saxml's `sax.Model(id, options)`)."""

from __future__ import annotations

from sax.lm import LanguageModel
from sax.naming import parse_model
from sax.options import Options


class Model:
    """A published model, e.g. `sax.Model("/sax/test/tiny").LM().Generate("Hi")`.

    Construction only checks the id (InvalidArgumentError for a malformed one); whether the model
    exists is found out on the first call.
    """

    def __init__(self, id: str, options: Options | None = None) -> None:
        self._name = parse_model(id)
        self._options = options or Options()

    @property
    def model_id(self) -> str:
        """The full id, e.g. "/sax/test/tiny"."""
        return self._name.full

    def LM(self) -> LanguageModel:
        """The language-model methods (Generate, GenerateStream, Score)."""
        return LanguageModel(self._name, self._options)

    def __repr__(self) -> str:
        return f"sax.Model({self._name.full!r})"
