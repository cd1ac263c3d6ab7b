"""GPU check: a bf16 backward through an upward (LCKV) layout gives finite gradients with sdpa and eager.

Run on a CUDA machine from the repo root: `PYTHONPATH=. python scripts/gpu_nan_check.py`.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import tiny_llama  # noqa: E402
from test_modeling import lckv_from_llama  # noqa: E402


def main() -> None:
    base = tiny_llama(6)
    for attn in ["sdpa", "eager"]:
        model = lckv_from_llama(base, "sandwich:2", attn, forward_passes=2, backward_passes=1)
        model = model.to("cuda", torch.bfloat16).train()
        ids = torch.randint(3, 320, (4, 64), device="cuda")
        mask = torch.ones_like(ids)
        mask[2:, :10] = 0
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        print(attn, "loss", loss.item(), "non-finite grads:", len(bad))


if __name__ == "__main__":
    main()
