"""Model package: `from model import Transformer, ModelConfig, init_cache, flops_per_token`."""

from solo.model.config import ModelConfig, flops_per_token
from solo.model.layers import attention_core
from solo.model.transformer import Transformer, init_cache

__all__ = ["Transformer", "ModelConfig", "init_cache", "flops_per_token", "attention_core"]
