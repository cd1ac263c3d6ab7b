"""LCKV Llama: a Llama whose layers may attend to the keys/values of another layer.

Read top to bottom like transformers' ``modeling_llama.py``. Plain Llama maths (RMSNorm, RoPE, MLP,
attention kernels) is imported from transformers; what is ours is the layer -> KV-source map, the
masks, the iteration over upward-reading blocks, and a cache that holds only KV-computing layers.

The one definition every code path matches (token t, layer i, source s = kv_sources[i]):
- s == i: causal attention over layer i's own KVs of tokens 0..t;
- s <  i: attention over layer s's KVs of tokens 0..t (computed earlier in the same pass);
- s >  i: attention over layer s's KVs of tokens 0..t-1 only; at a sequence's first token the
  attention output is exactly zero.

Copied next to every converted checkpoint as remote code: only relative imports of our own files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)
from transformers.utils import logging

from .configuration_lckv import PREFILL_MODES, LCKVLlamaConfig
from .layout import iteration_plan, kv_layers

logger = logging.get_logger(__name__)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by positions given as cos/sin [B, T, D] (Llama's RoPE, one tensor at a time)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


# ---------------------------------------------------------------------------------------------------------------
# Masks. Built once per forward from absolute cache indices, so they are bottom-right aligned by construction:
# query j of this call sits at cache index past + j. "strict" excludes the diagonal (layers reading a layer above).
# ---------------------------------------------------------------------------------------------------------------


def lckv_masks(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str,
    need_strict: bool,
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Return {"causal": (mask, visible_rows), "strict": (...)} in the format the attention kernel expects.

    ``mask`` is a bool [B, 1, q, kv] (True = attend) for sdpa or an additive float mask for eager, or None
    when plain causal attention without padding needs none. ``visible_rows`` [B, q, 1, 1] is False for query
    rows that see no key at all; their attention output is set to exactly zero for every backend.
    """
    kv_length = past_length + query_length
    q_idx = torch.arange(past_length, kv_length, device=device)[:, None]
    kv_idx = torch.arange(kv_length, device=device)[None, :]
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if attention_mask.shape[-1] != kv_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache and input hold {kv_length}: "
                "pass a 2-D mask over past + new tokens"
            )
    out = {}
    kinds = {"causal": kv_idx <= q_idx}
    if need_strict:
        kinds["strict"] = kv_idx < q_idx
    for name, allowed in kinds.items():
        if attention_mask is None and query_length == 1 and past_length > 0:
            out[name] = (None, None)  # decoding without padding: every key in view is visible (fast kernels)
            continue
        if name == "causal" and attention_mask is None and attn_implementation == "sdpa" and past_length == 0:
            out[name] = (None, None)  # the kernel's own causal path is exact here (and fastest)
            continue
        allowed = allowed[None, None, :, :].expand(batch_size, 1, query_length, kv_length)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :]
        # rows that see no key (strict rows at a sequence's first token, padding rows); checked without a device sync
        visible = None
        if attention_mask is not None or (name == "strict" and past_length == 0):
            any_key = allowed.any(-1, keepdim=True)  # [B, 1, q, 1]
            visible = any_key.transpose(1, 2)  # [B, q, 1, 1]
            # give such rows one dummy key (index 0) so no kernel sees an empty row: outputs and gradients stay
            # finite on every backend (empty rows give NaN gradients in some CUDA kernels); the output is zeroed
            allowed = allowed | (~any_key & (kv_idx == 0))
        if name == "strict" and query_length == 1 and past_length > 0:
            allowed = allowed[..., :past_length]  # decoding: a layer above has KVs of past tokens only
        if attn_implementation == "sdpa":
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        out[name] = (mask, visible)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cache: one DynamicLayer per KV-computing layer (slot = rank of the layer among KV layers).
# ---------------------------------------------------------------------------------------------------------------


class LCKVCache(DynamicCache):
    """A `DynamicCache` holding KVs for the KV-computing layers only, so it is (#KV layers / L) of a Llama's.

    Slots are created lazily in order; slot ``k`` belongs to the k-th KV layer of the layout.
    """

    def __init__(self, config: LCKVLlamaConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.kv_layer_ids = kv_layers(config.kv_sources) if config is not None else None

    def nbytes(self) -> int:
        """Bytes held by cached keys and values."""
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class LCKVSinkCache(LCKVCache):
    """StreamingLLM cache: per KV layer, the first ``sink`` tokens plus the latest ``window`` tokens.

    Positions are cache indices (StreamingLLM): a new token takes the position after the last kept one, and
    when tokens are evicted the kept window keys are re-rotated by minus the number evicted. Keys stay rotated in
    the cache (no RoPE work per decoding step); RoPE rotations compose, so re-rotating is exact. Because RoPE
    attention depends on position differences only, this equals attending with un-rotated keys rotated at read
    time. Only KV-computing layers are cached, so both savings multiply.
    """

    def __init__(self, config: LCKVLlamaConfig | None = None, sink: int = 4, window: int = 1024, **kwargs):
        super().__init__(config, **kwargs)
        if sink < 0 or window < 1:
            raise ValueError(f"streaming needs sink >= 0 and window >= 1, got sink={sink}, window={window}")
        self.sink, self.window = int(sink), int(window)

    def crop_attention_mask(self, attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
        """Keep the 2-D mask columns of the kept tokens (sinks, window) and the new ones."""
        kept = self.get_seq_length()
        seen = attention_mask.shape[-1] - query_length
        if seen == kept:
            return attention_mask
        tail = kept - min(self.sink, kept) + query_length
        return torch.cat([attention_mask[:, : min(self.sink, kept)], attention_mask[:, -tail:]], dim=-1)

    def evict(self, rotate: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Drop the oldest non-sink tokens beyond the budget; ``rotate(keys, shift)`` moves keys by ``shift``."""
        for layer in self.layers:
            length = layer.keys.shape[-2]
            extra = length - self.sink - self.window
            if extra <= 0:
                continue
            s = self.sink
            layer.keys = torch.cat([layer.keys[..., :s, :], rotate(layer.keys[..., s + extra :, :], -extra)], dim=-2)
            layer.values = torch.cat([layer.values[..., :s, :], layer.values[..., s + extra :, :]], dim=-2)


def cache_past(cache: Cache | None, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (keys, values) of a slot, or None when empty."""
    if cache is None or slot >= len(cache.layers):
        return None
    layer = cache.layers[slot]
    keys = getattr(layer, "keys", None)
    if not isinstance(keys, torch.Tensor) or keys.numel() == 0 or keys.shape[-2] == 0:
        return None
    return keys, layer.values


def store_kv(cache: Cache, slot: int, keys: torch.Tensor, values: torch.Tensor, past_length: int) -> None:
    """Store a layer's KVs over past + new tokens. The model already concatenated them, so a plain dynamic
    layer takes the tensors as they are (no second copy); other cache layers get the new tokens via update()."""
    layer = cache.layers[slot] if slot < len(cache.layers) else None
    if type(layer).__name__ == "DynamicLayer" and getattr(layer, "is_initialized", False) and past_length > 0:
        layer.keys, layer.values = keys, values
    else:
        cache.update(keys[..., past_length:, :], values[..., past_length:, :], slot)


# ---------------------------------------------------------------------------------------------------------------
# Attention and decoder layer
# ---------------------------------------------------------------------------------------------------------------


class LCKVAttention(nn.Module):
    """Llama attention whose keys/values may come from another layer.

    Only layers whose KVs some layer reads own ``k_proj``/``v_proj``.
    """

    def __init__(self, config: LCKVLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.has_kv_proj = layer_idx in set(config.kv_sources)

        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        if self.has_kv_proj:
            self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_states: torch.Tensor | None,
        value_states: torch.Tensor | None,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        visible_rows: torch.Tensor | None,
        compute_kv: bool,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Attend to ``key_states``/``value_states`` (another layer's, [B, Hkv, kv, D]) or, when they are None,
        to this layer's own past + new KVs. Returns (output, own keys, own values); own KVs only if ``compute_kv``."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings

        query_states = apply_rope(self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)

        own_key = own_value = None
        if compute_kv:
            own_key = apply_rope(self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)
            own_value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            if past_key is not None:
                own_key = torch.cat([past_key, own_key], dim=-2)
                own_value = torch.cat([past_value, own_value], dim=-2)
        if key_states is None:
            key_states, value_states = own_key, own_value

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # [B, q, H, D]
        if visible_rows is not None:  # rows with no visible key: exactly zero, whatever the backend does
            attn_output = torch.where(visible_rows, attn_output, torch.zeros((), dtype=attn_output.dtype))

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), own_key, own_value


class LCKVDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LCKVLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LCKVAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_states: torch.Tensor | None = None,
        value_states: torch.Tensor | None = None,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        visible_rows: torch.Tensor | None = None,
        compute_kv: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # KV tensors are positional so that gradient checkpointing tracks them (never pass them via mutable state)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, own_key, own_value = self.self_attn(
            hidden_states,
            key_states,
            value_states,
            past_key,
            past_value,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            visible_rows=visible_rows,
            compute_kv=compute_kv,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states, own_key, own_value


# ---------------------------------------------------------------------------------------------------------------
# Pretrained model plumbing
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LCKVModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus, on request, the KVs of every upward-read source layer after each pass."""

    pass_kvs: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None


@dataclass
class LCKVCausalLMOutput(CausalLMOutputWithPast):
    pass_kvs: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None


class LCKVLlamaPreTrainedModel(PreTrainedModel):
    config_class = LCKVLlamaConfig
    config: LCKVLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LCKVDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # strict-causal masks need an explicit mask: eager or sdpa
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    # a Llama checkpoint has k/v projections for every layer; only KV layers keep them
    _keys_to_ignore_on_load_unexpected = [r"model\.layers\.\d+\.self_attn\.[kv]_proj\.weight"]


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class LCKVLlamaModel(LCKVLlamaPreTrainedModel):
    def __init__(self, config: LCKVLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LCKVDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def num_kv_layers(self) -> int:
        return len(kv_layers(self.config.kv_sources))

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    routing_kv_sources: list[int] | None = None  # set per step by random-routing training (train mode only)

    def _resolve_sources(self, kv_sources: list[int] | None) -> list[int]:
        """The layout of this call: a per-call one, the routing draw of this training step, or the config's."""
        if kv_sources is None and self.training and self.routing_kv_sources is not None:
            kv_sources = self.routing_kv_sources
        if kv_sources is None:
            return self.config.kv_sources
        sources = [int(s) for s in kv_sources]
        n = self.config.num_hidden_layers
        if len(sources) != n or any(not 0 <= s < n for s in sources):
            raise ValueError(f"kv_sources must list one source layer in 0..{n - 1} for each of the {n} layers")
        missing = sorted({s for s in sources if not self.layers[s].self_attn.has_kv_proj})
        if missing:
            raise ValueError(f"kv_sources reads layers {missing}, which have no k/v projections in this checkpoint")
        return sources

    def _pass_counts(self, query_length: int, training: bool) -> tuple[int, int]:
        """(total passes, passes with gradient) over an upward-reading block."""
        m, b = self.config.forward_passes, self.config.backward_passes
        if training:
            return m + b, b
        # at inference token t is exact after t+1 passes (its upward inputs come from earlier tokens only),
        # so more passes than new tokens change nothing: skip them
        return max(1, min(m + b, query_length)), 0

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        prefill_mode: str | None = None,
        kv_sources: list[int] | None = None,
        output_pass_kvs: bool = False,
        **kwargs,
    ) -> LCKVModelOutput:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if kwargs.pop("output_attentions", False):
            raise ValueError("output_attentions is not supported by LCKV models: leave it False")
        kwargs.pop("return_dict", None)
        kwargs.pop("cache_position", None)
        sources = self._resolve_sources(kv_sources)
        mode = prefill_mode or self.config.prefill_mode
        if mode not in PREFILL_MODES:
            raise ValueError(f"prefill_mode {mode!r} is not one of {', '.join(PREFILL_MODES)}")
        output_hidden_states = bool(output_hidden_states)
        training = self.training and torch.is_grad_enabled()
        if use_cache is None:
            use_cache = self.config.use_cache and not training
        if self.gradient_checkpointing and training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False")
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = LCKVCache(self.config)
        cache = past_key_values if use_cache else None

        batch_size, query_length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        streaming = isinstance(cache, LCKVSinkCache)
        if streaming:  # positions are cache indices; the mask keeps the columns of kept tokens
            position_ids = None
            if attention_mask is not None:
                attention_mask = cache.crop_attention_mask(attention_mask, query_length)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)

        upward = any(s > i for i, s in enumerate(sources))
        # token by token: needed for exactness when a layer reads a layer above, and for a streaming cache to
        # evict between tokens (a parallel chunk attends to all its tokens, then evicts)
        if mode == "sequential" and (upward or streaming) and query_length > 1:
            return self._forward_sequential(
                inputs_embeds, attention_mask, position_ids, cache, sources, output_hidden_states, **kwargs
            )

        masks = lckv_masks(
            attention_mask,
            batch_size,
            query_length,
            past_length,
            inputs_embeds.dtype,
            inputs_embeds.device,
            self.config._attn_implementation,
            need_strict=upward,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        # slots in the cache: rank of each KV layer; their past KVs are read once, before any write
        kv_ids = kv_layers(sources)
        slot = {layer: k for k, layer in enumerate(kv_ids)}
        past = {layer: cache_past(cache, slot[layer]) for layer in kv_ids}

        full_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> its KVs over past + new tokens

        def run_layer(i: int, hidden: torch.Tensor, previous: dict[int, tuple[torch.Tensor, torch.Tensor]]):
            s = sources[i]
            compute_kv = i in slot
            own_past = past[i] if compute_kv else None
            if s == i:
                key = value = None
            elif s < i:
                key, value = full_kv[s]
            elif query_length == 1 and past[s] is not None:  # decoding: a layer above holds past tokens only
                key, value = past[s]
            else:  # a layer above: its KVs from the previous pass for the new tokens, the cache for the past
                key, value = previous[s]
                if past[s] is not None:
                    key, value = torch.cat([past[s][0], key], dim=-2), torch.cat([past[s][1], value], dim=-2)
            mask, visible = masks["strict" if s > i else "causal"]
            hidden, own_key, own_value = self.layers[i](
                hidden,
                key,
                value,
                None if own_past is None else own_past[0],
                None if own_past is None else own_past[1],
                position_embeddings=position_embeddings,
                attention_mask=mask,
                visible_rows=visible,
                compute_kv=compute_kv,
                **kwargs,
            )
            if compute_kv:
                full_kv[i] = (own_key, own_value)
            return hidden

        def finalize(first: int, last: int) -> None:
            """After a segment's final pass: hand its KV layers' KVs to the cache and drop our reference to
            their old past, so decoding holds one copy of the cache (as Llama's layer-by-layer update does)."""
            if cache is None:
                return
            for layer in range(first, last + 1):
                if layer in slot:
                    store_kv(cache, slot[layer], *full_kv[layer], past_length)
                    past[layer] = None

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        pass_kvs = [] if output_pass_kvs else None
        grad_enabled = torch.is_grad_enabled()
        for first, last, iterate in iteration_plan(sources):
            if not iterate:
                for i in range(first, last + 1):
                    hidden_states = run_layer(i, hidden_states, {})
                    finalize(i, i)
                    if output_hidden_states:
                        all_hidden.append(hidden_states)
                continue
            # an upward-reading block: passes start from zero KVs for the new tokens of its upward sources
            upward_sources = sorted({sources[i] for i in range(first, last + 1) if sources[i] > i})
            kv_shape = (batch_size, self.config.num_key_value_heads, query_length, self.layers[0].self_attn.head_dim)
            zeros = inputs_embeds.new_zeros(kv_shape)
            previous = {s: (zeros, zeros) for s in upward_sources}
            n_passes, n_grad = self._pass_counts(query_length, training)
            block_input = hidden_states
            for p in range(n_passes):
                with torch.set_grad_enabled(grad_enabled and (not training or p >= n_passes - n_grad)):
                    hidden_states = block_input
                    block_hidden = []
                    for i in range(first, last + 1):
                        hidden_states = run_layer(i, hidden_states, previous)
                        block_hidden.append(hidden_states)
                    current = {
                        s: (full_kv[s][0][..., past_length:, :], full_kv[s][1][..., past_length:, :])
                        for s in upward_sources
                    }
                if pass_kvs is not None:
                    pass_kvs.append(current)
                done = mode == "converge" and not training and _converged(previous, current, self.config.converge_tol)
                previous = current
                if done:
                    break
            finalize(first, last)
            if output_hidden_states:
                all_hidden.extend(block_hidden)

        if streaming:
            cache.evict(self._shift_keys)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden[-1] = hidden_states
        return LCKVModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            pass_kvs=pass_kvs,
        )

    def _shift_keys(self, keys: torch.Tensor, shift: int) -> torch.Tensor:
        """Re-rotate RoPE'd keys [B, H, T, D] by ``shift`` positions."""
        position = torch.full((1, 1), shift, device=keys.device, dtype=torch.long)
        cos, sin = self.rotary_emb(keys, position_ids=position)
        scale = getattr(self.rotary_emb, "attention_scaling", 1.0)  # applied once already, at projection
        return apply_rope(keys, cos / scale, sin / scale)

    def _forward_sequential(
        self, inputs_embeds, attention_mask, position_ids, cache, sources, output_hidden_states, **kwargs
    ) -> LCKVModelOutput:
        """The exact model: one token at a time through the cache (how decoding works)."""
        keep_cache = cache is not None
        if cache is None:
            cache = LCKVCache(self.config)
        past_length = cache.get_seq_length()
        outputs = []
        for t in range(inputs_embeds.shape[1]):
            step_mask = None if attention_mask is None else attention_mask[:, : past_length + t + 1]
            out = self.forward(
                inputs_embeds=inputs_embeds[:, t : t + 1],
                attention_mask=step_mask,
                position_ids=position_ids[:, t : t + 1],
                past_key_values=cache,
                use_cache=True,
                output_hidden_states=output_hidden_states,
                prefill_mode="iterative",
                kv_sources=sources,
                **kwargs,
            )
            outputs.append(out)
        hidden = None
        if output_hidden_states:
            hidden = tuple(torch.cat(h, dim=1) for h in zip(*(o.hidden_states for o in outputs)))
        return LCKVModelOutput(
            last_hidden_state=torch.cat([o.last_hidden_state for o in outputs], dim=1),
            past_key_values=cache if keep_cache else None,
            hidden_states=hidden,
        )


def _converged(previous: dict, current: dict, tol: float) -> bool:
    """True when no upward source's KVs moved by more than ``tol`` (max abs) between two passes."""
    return all(
        float((current[s][0] - previous[s][0]).abs().max()) <= tol
        and float((current[s][1] - previous[s][1]).abs().max()) <= tol
        for s in current
    )


class LCKVLlamaForCausalLM(LCKVLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LCKVLlamaConfig):
        super().__init__(config)
        self.model = LCKVLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prefill_mode: str | None = None,
        kv_sources: list[int] | None = None,
        output_pass_kvs: bool = False,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> LCKVCausalLMOutput:
        """Causal LM forward. ``prefill_mode`` (iterative | sequential | converge) overrides the config for this
        call; ``kv_sources`` overrides the layout (random-routing training)."""
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            prefill_mode=prefill_mode,
            kv_sources=kv_sources,
            output_pass_kvs=output_pass_kvs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)

        return LCKVCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            pass_kvs=outputs.pass_kvs,
        )

    def streaming_cache(self, sink: int = 4, window: int = 1024) -> LCKVSinkCache:
        """A StreamingLLM cache for ``generate(past_key_values=...)``: ``sink`` first tokens + the last ``window``."""
        return LCKVSinkCache(self.config, sink=sink, window=window)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Let generate() build its default cache, then swap a default DynamicCache for a sparse LCKVCache."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["past_key_values"] = LCKVCache(self.config)


LCKVLlamaConfig.register_for_auto_class()
LCKVLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LCKVSinkCache",
    "LCKVCache",
    "LCKVLlamaForCausalLM",
    "LCKVLlamaModel",
    "LCKVLlamaPreTrainedModel",
    "lckv_masks",
]
