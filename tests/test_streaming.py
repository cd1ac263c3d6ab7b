"""StreamingLLM cache (attention sinks + recent window) for every layout kind."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from reference import reference_logits
from test_modeling import lckv_from_llama

from lckv import LCKVSinkCache

LAYOUTS = ["plain", "sandwich:2", "top:2", "cla:2"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama(6, seed=1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", LAYOUTS)
def test_streamed_decode_equals_reference_on_truncated_context(base, spec, attn):
    model = lckv_from_llama(base, spec, attn)
    ids = torch.randint(3, 320, (2, 14), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(model, ids, model.config.kv_sources, sink=2, window=3)
    full = reference_logits(model, ids, model.config.kv_sources)
    cache = LCKVSinkCache(model.config, sink=2, window=3)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, prefill_mode="sequential").logits
    assert (out - ref).abs().max() <= 1e-4
    assert (out - full).abs().max() > 1e-3  # the truncation really changes the function
    assert all(layer.keys.shape[-2] == 5 for layer in cache.layers)
    assert len(cache.layers) == model.model.num_kv_layers


@pytest.mark.parametrize("spec", LAYOUTS)
def test_generate_with_streaming_cache_stays_bounded(base, spec):
    model = lckv_from_llama(base, spec)
    ids = torch.randint(3, 320, (2, 4))
    sizes = []
    cache = model.streaming_cache(sink=2, window=4)
    seq = ids
    with torch.no_grad():
        out = model(seq, past_key_values=cache, use_cache=True)
        for _ in range(12):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            out = model(nxt, past_key_values=cache, use_cache=True)
            sizes.append(max(layer.keys.shape[-2] for layer in cache.layers))
    assert max(sizes) <= 6 and sizes[-1] == 6
    gen = model.generate(
        ids,
        past_key_values=model.streaming_cache(sink=2, window=4),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(gen, seq[:, :16])
    torch.manual_seed(0)
    sampled = model.generate(
        ids, past_key_values=model.streaming_cache(2, 4), max_new_tokens=8, do_sample=True, top_k=4, pad_token_id=0
    )
    assert sampled.shape[1] == 12


@pytest.mark.parametrize("spec", ["plain", "sandwich:2"])
def test_large_window_equals_ordinary_cache(base, spec):
    model = lckv_from_llama(base, spec)
    ids = torch.randint(3, 320, (2, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True)
    a = model.generate(ids, return_dict_in_generate=True, **kw)
    b = model.generate(ids, past_key_values=model.streaming_cache(4, 64), return_dict_in_generate=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) <= 1e-5


def test_bad_streaming_arguments(base):
    model = lckv_from_llama(base, "plain")
    with pytest.raises(ValueError, match="window >= 1"):
        model.streaming_cache(sink=4, window=0)
