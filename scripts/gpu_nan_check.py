import sys, torch
sys.path.insert(0, "tests")
from conftest import tiny_llama
from test_modeling import lckv_from_llama
base = tiny_llama(6)
for attn in ["sdpa", "eager"]:
    m = lckv_from_llama(base, "sandwich:2", attn, forward_passes=2, backward_passes=1).to("cuda", torch.bfloat16).train()
    ids = torch.randint(3, 320, (4, 64), device="cuda")
    mask = torch.ones_like(ids); mask[2:, :10] = 0
    loss = m(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
    loss.backward()
    bad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    print(attn, "loss", loss.item(), "non-finite grads:", len(bad))
