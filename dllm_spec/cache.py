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
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
):
    """Run ``model`` on ``input_ids`` (B, n), appending their keys/values to ``cache``.

    ``attention_mask``: None for plain causal attention, or a prepared 4-D additive mask
    (B, 1, n, cached + n) (0 where attending, the dtype's minimum elsewhere), which transformers
    uses as is (a draft tree); ``position_ids`` (B, n) then give each row's position.
    """
    kwargs = {_cache_kwarg(type(model)): cache, "use_cache": True, "output_hidden_states": output_hidden_states}
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
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


def keep_path(cache: DynamicCache, start: int, path: torch.Tensor) -> None:
    """After a tree verification that wrote [root, node_0, ..] at positions start, start+1, ...:
    keep the context and the root (the first ``start + 1`` positions) and the accepted nodes
    ``path`` (n,) long, moved to positions start+1 .. start+n; drop the rest. Only the tail moves."""
    n = int(path.numel())
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None or not layer.keys.numel():
            continue
        src = (start + 1 + path).to(layer.keys.device)
        # gather first: node path[i] sits at or after slot i, so writing in place after the gather is safe
        layer.keys[..., start + 1: start + 1 + n, :] = layer.keys.index_select(-2, src)  # (B, H, n, D)
        layer.values[..., start + 1: start + 1 + n, :] = layer.values.index_select(-2, src)
    crop_cache(cache, start + 1 + n)
