"""Builds a torch decoder (Llama, BLOOM: the family of the config's architecture) from
(canonical name, tensor) pairs: checks, placement, streaming load.

The module is built on the "meta" device and each weight is placed on its device as it streams
in (`load_weights`), so the host never holds a second full copy of the model. With several
devices (a multi-GPU mesh) the layers are split into contiguous groups, one per device
(pipeline placement, `place`); the embeddings live on the first, the final norm and the output
projection on the last. With QUANTIZATION=int8 or int4 the layers' linear weights (and the
output projection, as LM_HEAD_QUANTIZATION says) are quantized as they stream in; after loading,
the projections are fused and the quantized forms set (`quantize`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from model_server.backends.torch import quantize
from model_server.models.bloom_torch import BloomForCausalLM
from model_server.models.llama_torch import LlamaForCausalLM
from model_server.models.paged_torch import PagedDecoder
from sax.errors import FailedPreconditionError
from servables.configs.bloom import BloomArchitecture
from servables.configs.llama import LlamaArchitecture
from servables.decoder_config import DecoderConfig

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint tensors that are not parameters here (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MISMATCH_HINT = "check that the config name matches the checkpoint"
# Architecture -> the torch model of its family.
MODELS: dict[type, type[PagedDecoder]] = {
    LlamaArchitecture: LlamaForCausalLM,
    BloomArchitecture: BloomForCausalLM,
}


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """DTYPE "auto" on `device`: bfloat16 on CUDA devices that compute in it (float16 on older
    ones) and on CPUs with AVX-512 BF16 or AMX tiles, whose oneDNN kernels compute in it;
    float32 on other CPUs, where bfloat16 is converted in software. Other dtypes as they
    are."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        chosen = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif device.type == "cpu" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    ):
        chosen = "bfloat16"
    else:
        chosen = "float32"
    logger.info("DTYPE auto: %s on %s", chosen, device)
    return chosen


def _check_config(config: DecoderConfig) -> None:
    if config.quantization not in ("none", "int8", "int4"):
        raise FailedPreconditionError(
            f"the torch engine serves QUANTIZATION none, int8 or int4, not {config.quantization!r}"
        )


def quantization_scheme(config: DecoderConfig) -> quantize.Scheme | None:
    """What QUANTIZATION, LM_HEAD_QUANTIZATION and QUANTIZATION_GROUP_SIZE ask for; None for
    float weights."""
    if config.quantization == "none":
        return None
    return quantize.Scheme(
        config.quantization, config.head_quantization, config.quantization_group_size
    )


def build_model(
    config: DecoderConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    devices: Sequence[torch.device | str] = ("cpu",),
) -> PagedDecoder:
    """The model with the checkpoint's weights, in `config.dtype`, placed on `devices` (layers
    split between them) and fused (quantized with QUANTIZATION=int8 or int4); no KV cache yet
    (`allocate_cache`).

    tensors: (canonical name, tensor) pairs, e.g. `Checkpoint.iter_tensors()` or a HF state
    dict's items. FAILED_PRECONDITION for an unknown, missing or misshapen tensor.
    """
    _check_config(config)
    arch = config.architecture()
    family = MODELS.get(type(arch))
    if family is None:
        raise FailedPreconditionError(
            f"the torch engine serves no model of {type(arch).__name__}; families: "
            f"{', '.join(sorted(a.__name__ for a in MODELS))}"
        )
    with torch.device("meta"):
        model = family(arch)
    place(model, [torch.device(d) for d in devices])
    scheme = quantization_scheme(config)
    quantized = load_weights(model, tensors, TORCH_DTYPES[config.dtype], scheme)
    quantize.fuse(model, quantized)
    model.eval()
    return model


def place(model: PagedDecoder, devices: Sequence[torch.device]) -> None:
    """Sets where the model runs: contiguous groups of layers, one group per device, in order."""
    n = model.config.num_layers
    model.devices = list(devices)
    model.layer_devices = [devices[i * len(devices) // n] for i in range(n)]


def _lacks(missing: Sequence[str]) -> FailedPreconditionError:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return FailedPreconditionError(
        f"the checkpoint lacks {len(missing)} tensors of the model: "
        f"{', '.join(missing[:5])}{more}; {_MISMATCH_HINT}"
    )


def load_weights(
    model: PagedDecoder,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    scheme: quantize.Scheme | None = None,
) -> dict[str, quantize.QuantizedWeight]:
    """Places each tensor on its device in dtype as it arrives, replacing the meta parameters.
    With a quantization `scheme`, the weights it covers are quantized as they arrive and
    returned (canonical name -> quantized weight) instead: their parameters become None, the
    output projection's weight a storage-less stand-in (`_stand_in_for_head`). A tied output
    projection it covers is quantized from the embeddings, which stay for the lookup."""
    quantized: dict[str, quantize.QuantizedWeight] = {}
    tied = model.config.tie_embeddings
    params = dict(model.named_parameters())
    if tied:
        params.pop("lm_head.weight")
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        param = params.get(name)
        if param is None:
            raise FailedPreconditionError(
                f"the checkpoint has a tensor {name!r} that a {type(model).__name__} of this "
                f"config does not; {_MISMATCH_HINT}"
            )
        if tuple(tensor.shape) != tuple(param.shape):
            raise FailedPreconditionError(
                f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, the config expects "
                f"{list(param.shape)}; {_MISMATCH_HINT}"
            )
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        device = model.param_device(name)
        loaded.add(name)
        if scheme is not None and (kind := scheme.kind(name, tensor)) != "none":
            quantized[name] = scheme.quantize(kind, tensor, device, dtype)
            module._parameters[leaf] = None
            continue
        value = tensor.detach().to(device=device, dtype=dtype)
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    missing = sorted(set(params) - loaded)
    if missing:
        raise _lacks(missing)
    head_device = model.param_device(quantize.HEAD)
    if tied and scheme is not None and scheme.head != "none":
        embed = model.embedding().weight
        quantized[quantize.HEAD] = scheme.quantize(scheme.head, embed, head_device, dtype)
    elif tied:
        embed = model.embedding().weight
        weight = embed
        if embed.device != head_device:
            weight = nn.Parameter(embed.detach().to(head_device), requires_grad=False)
        model.lm_head.weight = weight
    if quantize.HEAD in quantized:
        _stand_in_for_head(model, dtype)
    logger.debug("loaded %d tensors onto %s", len(loaded), sorted({str(d) for d in model.devices}))
    return quantized


def _stand_in_for_head(model: PagedDecoder, dtype: torch.dtype) -> None:
    """Replaces the output projection's float weight, served from its quantized copy
    (`PagedDecoder.head`), by a "meta" tensor of its shape and dtype: no storage, not a
    parameter, still the model's dtype (the KV cache's), and an error if it is multiplied."""
    lm_head = model.lm_head
    lm_head._parameters.pop("weight", None)
    shape = (lm_head.out_features, lm_head.in_features)
    lm_head.weight = torch.empty(shape, dtype=dtype, device="meta")
