"""The core model computes one function: parallel iterative forward, sequential mode and generate() with the
cache all agree with an independent token-by-token reference (tests/reference.py), for every layout kind and
both attention backends."""

from __future__ import annotations

import pytest
import torch
from conftest import run_without_lckv, tiny_llama
from reference import reference_logits
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from lckv import LCKVCache, LCKVLlamaConfig, LCKVLlamaForCausalLM, parse_layout

LAYOUTS = ["plain", "sandwich:2", "bottom:2", "top:2", "cla:2", "cla:3", "0,5,5,3,3,5", "2,2,2,5,5,5", "sandwich:0"]
BACKENDS = ["eager", "sdpa"]
TOL = 1e-4


def lckv_from_llama(base, spec: str, attn: str = "sdpa", **cfg) -> LCKVLlamaForCausalLM:
    """Same weights as ``base``, k/v projections kept only where the layout reads them."""
    d = {k: v for k, v in base.config.to_dict().items() if k not in ("architectures", "model_type")}
    d.update(cfg)
    config = LCKVLlamaConfig(**d, kv_sources=parse_layout(spec, base.config.num_hidden_layers))
    model = LCKVLlamaForCausalLM(config)
    missing, _ = model.load_state_dict(base.state_dict(), strict=False)
    assert not missing
    model.set_attn_implementation(attn)
    return model.eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama(6, seed=0)


def left_padded_batch(lengths, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n :] = 1
        ids[b, : total - n] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("spec", LAYOUTS)
@pytest.mark.parametrize("length", [1, 4, 9])
def test_parallel_and_sequential_equal_reference(base, spec, attn, length):
    model = lckv_from_llama(base, spec, attn)
    ids = torch.randint(3, 320, (2, length), generator=torch.Generator().manual_seed(length))
    ref = reference_logits(model, ids, model.config.kv_sources)
    with torch.no_grad():
        iterative = model(ids, prefill_mode="iterative").logits
        sequential = model(ids, prefill_mode="sequential").logits
    assert (iterative - ref).abs().max() <= TOL
    assert (sequential - ref).abs().max() <= TOL


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("spec", ["sandwich:2", "top:2", "cla:2"])
def test_long_prompt_needs_enough_passes(base, spec, attn):
    """With m + b >= T iteration is exact; with fewer passes an upward layout is only approximate."""
    ids = torch.randint(3, 320, (1, 16), generator=torch.Generator().manual_seed(3))
    exact = lckv_from_llama(base, spec, attn, forward_passes=14, backward_passes=2)
    ref = reference_logits(exact, ids, exact.config.kv_sources)
    with torch.no_grad():
        assert (exact(ids).logits - ref).abs().max() <= TOL
        short = lckv_from_llama(base, spec, attn, forward_passes=1, backward_passes=1)
        gap = (short(ids).logits - ref).abs().max()
    if spec == "cla:2":
        assert gap <= TOL  # downward sharing needs no iteration
    else:
        assert gap > 1e-3


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("spec", ["plain", "sandwich:2", "top:2", "cla:2", "0,5,5,3,3,5"])
def test_left_padding(base, spec, attn):
    model = lckv_from_llama(base, spec, attn)
    ids, mask = left_padded_batch([7, 4, 1], 7)
    ref = reference_logits(model, ids, model.config.kv_sources, real=mask.bool())
    real = mask.bool()
    with torch.no_grad():
        for mode in ("iterative", "sequential"):
            out = model(ids, attention_mask=mask, position_ids=positions(mask), prefill_mode=mode).logits
            assert torch.isfinite(out).all()
            assert (out[real] - ref[real]).abs().max() <= TOL, mode


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("spec", ["plain", "sandwich:2", "bottom:2", "top:2", "cla:2", "2,2,2,5,5,5"])
@pytest.mark.parametrize("prefill", ["iterative", "sequential"])
def test_generate_with_cache_matches_reference(base, spec, attn, prefill):
    """Greedy decode, batch 2, left padding: every step's logits equal the definition on the full sequence."""
    model = lckv_from_llama(base, spec, attn)
    ids, mask = left_padded_batch([6, 3], 6, seed=1)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        prefill_mode=prefill,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert isinstance(out.past_key_values, LCKVCache)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    ref = reference_logits(model, seq, model.config.kv_sources, real=full_mask.bool())
    steps = torch.stack(out.logits, dim=1)  # [B, 5, V]: logits that chose tokens 6..10
    assert (steps - ref[:, 5:10]).abs().max() <= TOL
    assert torch.equal(seq[:, 6:], ref[:, 5:10].argmax(-1))


def test_plain_layout_equals_transformers_llama(base):
    for attn in BACKENDS:
        base.set_attn_implementation(attn)
        model = lckv_from_llama(base, "plain", attn)
        ids, mask = left_padded_batch([8, 5], 8, seed=2)
        with torch.no_grad():
            a = base(ids, attention_mask=mask, position_ids=positions(mask)).logits
            b = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        real = mask.bool()
        assert (a[real] - b[real]).abs().max() <= TOL
        ga = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        gb = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(ga, gb)


def test_sampling_and_beam_search_run(base):
    model = lckv_from_llama(base, "sandwich:2")
    ids, mask = left_padded_batch([5, 3], 5)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert out.shape == (2, 9)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3, pad_token_id=0)
    assert beams.shape == (2, 9)


@pytest.mark.parametrize("spec", ["sandwich:2", "top:2"])
def test_cache_holds_only_kv_layers(base, spec):
    model = lckv_from_llama(base, spec)
    ids = torch.randint(3, 320, (2, 12))
    n_tokens = 12 + 8
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    out = model.generate(ids, **kw)
    cache = out.past_key_values
    assert len(cache.layers) == model.model.num_kv_layers
    ref = base.generate(ids, **kw)
    llama_cache = ref.past_key_values
    assert isinstance(llama_cache, DynamicCache)

    def nbytes(c):
        return sum(t.numel() * t.element_size() for layer in c.layers for t in (layer.keys, layer.values))

    ratio = cache.nbytes() / nbytes(llama_cache)
    assert ratio == pytest.approx(model.model.num_kv_layers / 6, rel=0.01)
    assert cache.get_seq_length() == n_tokens - 1  # the last sampled token is never fed back


def test_use_cache_false_and_no_cache_object(base):
    model = lckv_from_llama(base, "sandwich:2")
    ids = torch.randint(3, 320, (1, 6))
    out = model(ids, use_cache=False)
    assert out.past_key_values is None
    gen = model.generate(ids, max_new_tokens=3, use_cache=False, do_sample=False, pad_token_id=0)
    gen_cached = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_cached)


@pytest.mark.parametrize("spec", ["sandwich:2", "cla:2", "0,5,5,3,3,5"])
def test_gradient_checkpointing_gives_same_gradients(base, spec):
    ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(5))
    grads = []
    losses = []
    for checkpointing in (False, True):
        model = lckv_from_llama(base, spec, forward_passes=3, backward_passes=2).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() <= 1e-5, name
    # k/v projections of the upward source get gradients only through the grad passes, but they do get some
    kv = [n for n in grads[0] if "k_proj" in n]
    assert kv and all(grads[0][n].abs().sum() > 0 for n in kv)


def test_training_forward_equals_inference_when_converged(base):
    model = lckv_from_llama(base, "sandwich:2")
    ids = torch.randint(3, 320, (2, 8))
    model.train()
    train_logits = model(ids, use_cache=False).logits.detach()
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert (train_logits - eval_logits).abs().max() <= TOL


def test_converge_mode_and_pass_trace(base):
    model = lckv_from_llama(base, "sandwich:2", forward_passes=20, backward_passes=2, converge_tol=1e-5)
    ids = torch.randint(3, 320, (1, 24))
    ref = reference_logits(model, ids, model.config.kv_sources)
    with torch.no_grad():
        it = model(ids, output_pass_kvs=True)
        conv = model(ids, prefill_mode="converge", output_pass_kvs=True)
    assert len(it.pass_kvs) == 22
    assert 1 < len(conv.pass_kvs) <= 22
    assert set(it.pass_kvs[0]) == {4}
    assert (conv.logits - ref).abs().max() <= 1e-3
    assert (it.logits - ref).abs().max() <= TOL


def test_per_call_layout_override_equals_fixed_layout(base):
    """Random-routing training runs a plain checkpoint with another layout; it must equal that layout's model."""
    plain = lckv_from_llama(base, "plain")
    cla = lckv_from_llama(base, "cla:2")
    ids = torch.randint(3, 320, (2, 6))
    with torch.no_grad():
        a = plain(ids, kv_sources=cla.config.kv_sources).logits
        b = cla(ids).logits
    assert (a - b).abs().max() <= TOL
    with pytest.raises(ValueError, match="no k/v projections"):
        cla(ids, kv_sources=[0, 1, 2, 3, 4, 5])


def test_bad_arguments(base):
    model = lckv_from_llama(base, "sandwich:2")
    ids = torch.randint(3, 320, (1, 4))
    with pytest.raises(ValueError, match="prefill_mode"):
        model(ids, prefill_mode="fast")
    with pytest.raises(ValueError, match="attention_mask covers"):
        model(ids, attention_mask=torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_sources"):
        LCKVLlamaConfig(num_hidden_layers=3, kv_sources=[0, 0])


def test_save_load_auto_classes(base, tmp_path):
    model = lckv_from_llama(base, "sandwich:2")
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"configuration_lckv.py", "modeling_lckv.py", "layout.py", "config.json"} <= names
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.kv_sources == model.config.kv_sources
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_lckv.LCKVLlamaForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.4.self_attn.k_proj.weight" in keys
    assert "model.layers.1.self_attn.k_proj.weight" not in keys
    ids = torch.randint(3, 320, (1, 5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_remote_code_loads_without_lckv_installed(base, tmp_path):
    model = lckv_from_llama(base, "sandwich:2")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    ids = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, prefill_mode="sequential").logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    script = f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    got = m(io["ids"], prefill_mode="sequential").logits
    out = m.generate(io["ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)
diff = (got - io["expected"]).abs().max().item()
assert diff <= 1e-5, diff
print("OK", type(m).__name__, out.shape[1], diff)
"""
    res = run_without_lckv(script, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK LCKVLlamaForCausalLM 10" in res.stdout


@pytest.mark.parametrize("attn", BACKENDS)
def test_padded_training_has_finite_gradients(base, attn):
    """Rows that see no key (pads, a layer above at the first token) get a dummy key and a zeroed output."""
    model = lckv_from_llama(base, "sandwich:2", attn, forward_passes=2, backward_passes=1).train()
    ids, mask = left_padded_batch([6, 2], 6)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, position_ids=positions(mask), labels=labels, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
