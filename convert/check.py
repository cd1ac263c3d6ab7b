"""``--check``: reload the converted model and compare it with the source on a short real text.

Prints (and writes to the card) the perplexity of both on a built-in public-domain passage, and the
greedy continuation of a prompt, so the user sees how much fine-tuning has to recover.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..layout import has_upward
from .check_text import CHECK_TEXT, PROMPT

logger = logging.getLogger(__name__)

CHECK_MAX_PARAMS = 1_000_000_000  # --check is on by default below this size


@dataclass
class CheckResult:
    """Perplexities and greedy continuations of the source and the converted model."""

    tokens: int
    window: int
    source_ppl: float
    lckv_ppl_sequential: float
    lckv_ppl_iterative: float | None  # None when the layout reads no layer above (one pass is exact)
    prompt: str
    source_text: str
    lckv_text: str
    same_tokens: int  # leading generated tokens that agree
    new_tokens: int

    def rows(self) -> dict[str, str]:
        out = {
            "check text": f"{self.tokens} tokens of a built-in public-domain passage, {self.window}-token windows",
            "source perplexity": f"{self.source_ppl:.2f}",
            "LCKV perplexity (sequential, exact)": f"{self.lckv_ppl_sequential:.2f}",
        }
        if self.lckv_ppl_iterative is not None:
            out["LCKV perplexity (iterative prefill)"] = f"{self.lckv_ppl_iterative:.2f}"
        out["greedy tokens that agree"] = f"{self.same_tokens} of {self.new_tokens}"
        out["source continues"] = repr(self.source_text)
        out["LCKV continues"] = repr(self.lckv_text)
        return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 256, batch_size: int = 8, **forward_kwargs) -> float:
    """Perplexity over non-overlapping windows of ``ids`` (1-D), each predicted from its own start.

    Windows of equal length run as one batch (sequential prefill then costs one window's steps).
    """
    windows = [ids[s : s + window] for s in range(0, ids.numel(), window)]
    windows = [w for w in windows if w.numel() >= 2]
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(w.numel(), []).append(w)
    nll, count = 0.0, 0
    for same_length in groups.values():
        for k in range(0, len(same_length), batch_size):
            batch = torch.stack(same_length[k : k + batch_size])
            logits = model(batch, use_cache=False, **forward_kwargs).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, pad_token_id: int | None, **kwargs) -> list[int]:
    out = model.generate(
        ids.unsqueeze(0),
        attention_mask=torch.ones_like(ids).unsqueeze(0),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_token_id,
        **kwargs,
    )
    return out[0, ids.numel() :].tolist()


def run_check(
    source_model, lckv_model, tokenizer, window: int = 256, new_tokens: int = 24, max_tokens: int = 256
) -> CheckResult:
    """Compare the source and converted models (both in eval mode) on the built-in text."""
    source_model.eval()
    lckv_model.eval()
    window = min(window, int(getattr(lckv_model.config, "max_position_embeddings", window) or window))
    ids = torch.tensor(tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"][:max_tokens], dtype=torch.long)
    prompt = torch.tensor(tokenizer(PROMPT, add_special_tokens=False)["input_ids"], dtype=torch.long)
    upward = has_upward(lckv_model.config.kv_sources)
    logger.info("check: perplexity of the source model")
    source_ppl = perplexity(source_model, ids, window)
    logger.info("check: perplexity of the converted model (sequential)")
    seq_ppl = perplexity(lckv_model, ids, window, prefill_mode="sequential")
    it_ppl = perplexity(lckv_model, ids, window, prefill_mode="iterative") if upward else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logger.info("check: greedy continuations")
    a = greedy(source_model, prompt, new_tokens, pad)
    b = greedy(lckv_model, prompt, new_tokens, pad, prefill_mode="sequential")
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return CheckResult(
        tokens=ids.numel(),
        window=window,
        source_ppl=source_ppl,
        lckv_ppl_sequential=seq_ppl,
        lckv_ppl_iterative=it_ppl,
        prompt=PROMPT,
        source_text=tokenizer.decode(a, skip_special_tokens=True),
        lckv_text=tokenizer.decode(b, skip_special_tokens=True),
        same_tokens=same,
        new_tokens=new_tokens,
    )


def load_source_model(src, reader=None):
    """The source model in float32 for comparison (no remote code: Llama, Mistral or LCKV classes)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM

    from .. import LCKVLlamaForCausalLM
    from .sources import llama_kwargs

    if src.kind == "gguf":
        config = LlamaConfig(**llama_kwargs(src.config))
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        tensors = {n: reader.get(n).float() for n in reader.names}
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if set(missing) - {"lm_head.weight"} or unexpected:
            raise RuntimeError(f"GGUF tensors do not fit a Llama: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # real buffers, not meta
        return model.eval()
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "lckv_llama": LCKVLlamaForCausalLM}
    return cls[src.config["model_type"]].from_pretrained(str(src.folder), dtype=torch.float32).eval()


def load_converted(folder: Path):
    """The converted checkpoint through lckv's model class, float32."""
    from .. import LCKVLlamaForCausalLM

    return LCKVLlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
