"""GPU check of the core model: fp32 exactness on CUDA, bf16 agreement, fully-masked rows, decode speed.

Run on a CUDA machine: `python scripts/gpu_check.py --out results.json`. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import tiny_llama  # noqa: E402
from reference import reference_logits  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lckv import LCKVLlamaConfig, LCKVLlamaForCausalLM, parse_layout  # noqa: E402


def convert(base, spec, attn, dtype, device):
    d = {k: v for k, v in base.config.to_dict().items() if k not in ("architectures", "model_type")}
    m = LCKVLlamaForCausalLM(LCKVLlamaConfig(**d, kv_sources=parse_layout(spec, base.config.num_hidden_layers)))
    m.load_state_dict(base.state_dict(), strict=False)
    m.set_attn_implementation(attn)
    return m.to(device=device, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    dev = "cuda"
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    import transformers

    res["transformers"] = transformers.__version__
    # 1. fp32 exactness on CUDA vs the CPU reference, left padding
    base = tiny_llama(6)
    ids = torch.randint(3, 320, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = []
    for spec in ["sandwich:2", "top:2", "cla:2", "0,5,5,3,3,5"]:
        for attn in ["eager", "sdpa"]:
            m = convert(base, spec, attn, torch.float32, dev)
            ref = reference_logits(
                convert(base, spec, "eager", torch.float32, "cpu"), ids, m.config.kv_sources, mask.bool()
            )
            with torch.no_grad():
                for mode in ["iterative", "sequential"]:
                    out = m(
                        ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), prefill_mode=mode
                    ).logits.cpu()
                    diff = (out[mask.bool()] - ref[mask.bool()]).abs().max().item()
                    rows.append({"layout": spec, "attn": attn, "mode": mode, "dtype": "fp32", "max_abs_diff": diff})
    # 2. bf16: a mid-size random Llama, iterative vs sequential and generate, fully masked rows finite
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    big = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 32000, (4, 64))
    mask = torch.ones_like(ids)
    mask[2:, :20] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for spec in ["sandwich:2", "cla:2"]:
        for attn in ["eager", "sdpa"]:
            m = convert(big, spec, attn, torch.bfloat16, dev)
            m32 = convert(big, spec, attn, torch.float32, dev)
            with torch.no_grad():
                kw = dict(attention_mask=mask.to(dev), position_ids=pos.to(dev))
                exact = m32(ids.to(dev), prefill_mode="sequential", **kw).logits.float()
                for mode in ["iterative", "sequential"]:
                    out = m(ids.to(dev), prefill_mode=mode, **kw).logits.float()
                    ok = bool(torch.isfinite(out).all())
                    diff = (out - exact)[mask.to(dev).bool()].abs()
                    rows.append(
                        {
                            "layout": spec,
                            "attn": attn,
                            "mode": mode,
                            "dtype": "bf16",
                            "finite": ok,
                            "max_abs_diff_vs_fp32_exact": diff.max().item(),
                            "mean_abs_diff": diff.mean().item(),
                        }
                    )
    res["equivalence"] = rows
    # 3. decode speed, base vs sandwich:2, bf16, batch 32, 512 prompt + 128 new tokens
    speed = []
    import copy

    llama = copy.deepcopy(big).to(dev, torch.bfloat16)
    llama.set_attn_implementation("sdpa")
    for name, model in [("llama", llama), ("sandwich:2", convert(big, "sandwich:2", "sdpa", torch.bfloat16, dev))]:
        ids = torch.randint(0, 32000, (32, 512), device=dev)
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, return_dict_in_generate=True
            )
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids[:1])
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        cache = out.past_key_values
        nbytes = sum(
            c.keys.numel() * c.keys.element_size() * 2 for c in cache.layers if c.keys is not None and c.keys.numel()
        )
        speed.append(
            {
                "model": name,
                "batch": 32,
                "prompt": 512,
                "new": 128,
                "seconds": dt,
                "tokens_per_s": 32 * 128 / dt,
                "kv_cache_bytes": nbytes,
                "ttft_batch1_s": ttft,
            }
        )
    res["speed"] = speed
    # 4. TTFT by prefill mode (batch 1, 512-token prompt), and the largest batch that fits a memory budget
    sand = convert(big, "sandwich:2", "sdpa", torch.bfloat16, dev)
    prompt = torch.randint(0, 32000, (1, 512), device=dev)
    ttft = {}
    for name, model, mode in [
        ("llama", llama, None),
        ("sandwich:2", sand, "iterative"),
        ("sandwich:2", sand, "converge"),
        ("sandwich:2", sand, "sequential"),
    ]:
        kw = {} if mode is None else {"prefill_mode": mode}
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(prompt, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ttft[f"{name}/{mode or 'parallel'}"] = sorted(times)[2]
    res["ttft_512_s"] = ttft
    budget_gb = 12
    torch.cuda.set_per_process_memory_fraction(budget_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    maxb = []
    for name, model in [("llama", llama), ("sandwich:2", sand)]:
        best = None
        batch = 16
        while batch <= 4096:
            try:
                torch.cuda.empty_cache()
                ids = torch.randint(0, 32000, (batch, 512), device=dev)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                best = {"model": name, "max_batch_pow2": batch, "tokens_per_s": batch * 128 / dt, "seconds": dt}
                batch *= 2
            except torch.cuda.OutOfMemoryError:
                break
        maxb.append(best)
        torch.cuda.empty_cache()
    res["max_batch_in_budget"] = {"budget_gb": budget_gb, "prompt": 512, "new": 128, "rows": maxb}
    print(ttft)
    print(maxb)
    for r in rows + speed:
        print(r)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
