"""An independent, naive implementation of the LCKV definition, used as the oracle in tests.

Token by token, bottom layer to top, with plain Python lists of per-token KVs and an explicit softmax:
nothing here is shared with lckv's model code except the weights it reads.
"""

from __future__ import annotations

import torch


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, pos, head_dim, theta):
    # x [H, D] at integer position pos
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    ang = pos * inv
    emb = torch.cat([ang, ang])
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = head_dim // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


@torch.no_grad()
def reference_logits(
    model,
    input_ids: torch.Tensor,
    kv_sources: list[int],
    real: torch.Tensor | None = None,
    sink: int | None = None,
    window: int | None = None,
):
    """Logits [B, T, V] of an LCKV model computed straight from the definition.

    ``model`` is an LCKVLlamaForCausalLM (only its weights are read). ``real`` [B, T] marks real tokens
    (left padding = 0): pads are skipped. Keys are kept un-rotated and rotated at read time by their index in
    the kept list, the query by the number of tokens kept before it. With ``sink``/``window`` (StreamingLLM)
    each layer keeps its first ``sink`` tokens and latest ``window`` tokens after every token.
    """
    cfg = model.config
    L = cfg.num_hidden_layers
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]
    eps = cfg.rms_norm_eps
    B, T = input_ids.shape
    if real is None:
        real = torch.ones(B, T, dtype=torch.bool)
    layers = model.model.layers
    out = torch.zeros(B, T, cfg.vocab_size)
    for b in range(B):
        kv = {i: [] for i in range(L)}  # layer -> list of (raw k [Hkv, D], v [Hkv, D]) of kept real tokens
        for t in range(T):
            if not real[b, t]:
                continue
            x = model.model.embed_tokens.weight[input_ids[b, t]].clone()
            pos = len(kv[kv_sources[0]])  # tokens kept before this one (every KV layer keeps the same count)
            for i in range(L):
                layer = layers[i]
                att = layer.self_attn
                h = _rms(x, layer.input_layernorm.weight, eps)
                q = _rope((att.q_proj.weight @ h).view(H, D), pos, D, theta)
                if i in set(kv_sources):
                    k = (att.k_proj.weight @ h).view(Hkv, D)
                    v = (att.v_proj.weight @ h).view(Hkv, D)
                    kv[i].append((k, v))
                s = kv_sources[i]
                keys = kv[s]  # for s > i this holds tokens < t only: layer s has not run for token t yet
                if len(keys) == 0:
                    a = torch.zeros(H * D)
                else:
                    K = torch.stack([_rope(k, n, D, theta) for n, (k, _) in enumerate(keys)])  # [n, Hkv, D]
                    V = torch.stack([v for _, v in keys])
                    rep = H // Hkv
                    K = K.repeat_interleave(rep, dim=1)
                    V = V.repeat_interleave(rep, dim=1)
                    scores = torch.einsum("hd,nhd->hn", q, K) * D**-0.5
                    w = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                    a = torch.einsum("hn,nhd->hd", w, V).reshape(H * D)
                x = x + att.o_proj.weight @ a
                h2 = _rms(x, layer.post_attention_layernorm.weight, eps)
                m = layer.mlp
                x = x + m.down_proj.weight @ (
                    torch.nn.functional.silu(m.gate_proj.weight @ h2) * (m.up_proj.weight @ h2)
                )
            x = _rms(x, model.model.norm.weight, eps)
            out[b, t] = model.lm_head.weight @ x
            if window is not None:
                for i in kv:
                    if len(kv[i]) > sink + window:
                        kv[i] = kv[i][:sink] + kv[i][len(kv[i]) - window :]
    return out
