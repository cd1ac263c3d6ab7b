"""A quick end-to-end check on a tiny random Llama: convert in memory, compare parallel, sequential and generate.

Replaced by the full demo once the converter and fine-tuning land.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import LCKVLlamaConfig, LCKVLlamaForCausalLM, parse_layout


def main() -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    d = {k: v for k, v in base.config.to_dict().items() if k not in ("architectures", "model_type")}
    model = LCKVLlamaForCausalLM(LCKVLlamaConfig(**d, kv_sources=parse_layout("sandwich:2", 8)))
    model.load_state_dict(base.state_dict(), strict=False)
    model.eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        gap = (model(ids).logits - model(ids, prefill_mode="sequential").logits).abs().max().item()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    print(
        f"layout {model.config.kv_sources}: parallel vs sequential max |diff| = {gap:.2e}; "
        f"generated {out.sequences.shape[1] - 9} tokens with a {len(out.past_key_values.layers)}-layer cache"
    )


if __name__ == "__main__":
    main()
