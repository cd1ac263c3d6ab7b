"""lckv: Llama models with a depth-wise shared (layer-condensed) KV cache."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_lckv import LCKVLlamaConfig
from .layout import LayoutError, iteration_plan, kv_cache_fraction, kv_layers, parse_layout, validate_kv_sources
from .modeling_lckv import LCKVCache, LCKVLlamaForCausalLM, LCKVLlamaModel, LCKVSinkCache

AutoConfig.register(LCKVLlamaConfig.model_type, LCKVLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LCKVLlamaConfig, LCKVLlamaForCausalLM, exist_ok=True)

__all__ = [
    "LCKVCache",
    "LCKVLlamaConfig",
    "LCKVLlamaForCausalLM",
    "LCKVLlamaModel",
    "LCKVSinkCache",
    "LayoutError",
    "iteration_plan",
    "kv_cache_fraction",
    "kv_layers",
    "parse_layout",
    "validate_kv_sources",
]
