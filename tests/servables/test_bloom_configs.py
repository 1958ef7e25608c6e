"""BLOOM's registered configs and the checkpoint checks between families."""

from __future__ import annotations

import pytest

from sax.errors import FailedPreconditionError
from servables import registry


def test_published_shapes_give_the_published_sizes() -> None:
    # bloom-560m has 559M parameters; Firefly's 2b6 is bloom-3b with a 46145-token vocabulary.
    assert round(registry.get("bloom.Bloom560M").num_params() / 1e6) == 559
    assert round(registry.get("bloom.Firefly2B6").num_params() / 1e9, 1) == 2.5


def test_a_checkpoint_of_another_family_is_refused_in_one_line() -> None:
    bloom, llama = registry.get("bloom.Bloom560M"), registry.get("llama.SmolLM2_135M")
    with pytest.raises(FailedPreconditionError, match=r"holds a 'llama' model but .* BLOOM"):
        bloom.architecture().check_checkpoint({}, "/ckpt", config_name="Bloom560M")
    with pytest.raises(FailedPreconditionError, match=r"holds a 'bloom' model but .* Llama"):
        llama.architecture().check_checkpoint({"model_type": "bloom"}, "/ckpt")
    with pytest.raises(FailedPreconditionError, match="n_layer=2 but the config has num_layers"):
        bloom.architecture().check_checkpoint({"model_type": "bloom", "n_layer": 2}, "/ckpt")
