"""Model package: `from model import Transformer, ModelConfig, init_cache, flops_per_token`."""

from model.config import ModelConfig, flops_per_token
from model.layers import attention_core
from model.transformer import Transformer, init_cache

__all__ = ["Transformer", "ModelConfig", "init_cache", "flops_per_token", "attention_core"]
