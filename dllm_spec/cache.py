"""KV-cache handling: one place that knows the transformers cache API (argument names changed
between releases: 5.x uses ``cache=``, earlier ones ``past_key_values=``)."""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache, PreTrainedModel


@functools.lru_cache(maxsize=None)
def _cache_kwarg(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty dynamic KV cache for ``model``."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def forward_with_cache(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    output_hidden_states: bool = False,
    logits_to_keep: int = 0,
):
    """Run ``model`` on ``input_ids`` (B, n), appending their keys/values to ``cache``."""
    kwargs = {_cache_kwarg(type(model)): cache, "use_cache": True, "output_hidden_states": output_hidden_states}
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    return model(input_ids=input_ids, **kwargs)


def cache_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer."""
    remove = cache_length(cache) - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache_length(cache)} positions to {length}")
    if remove:
        cache.crop(-remove)  # a negative argument removes that many trailing positions (all 4.4x-5.x releases)
