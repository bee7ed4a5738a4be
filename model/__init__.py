"""The model: `from solo.model import Transformer, ModelConfig, DecodeCache, init_cache`."""

from solo.model.config import ModelConfig, flops_per_token
from solo.model.kvcache import DecodeCache, LayerCache
from solo.model.layers import attention_core
from solo.model.transformer import Transformer, init_cache, init_params, unstack_layers

__all__ = ["Transformer", "ModelConfig", "DecodeCache", "LayerCache", "init_cache", "init_params",
           "unstack_layers", "flops_per_token", "attention_core"]
