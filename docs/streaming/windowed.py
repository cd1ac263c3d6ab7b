"""Ordinary (non-streaming) perplexity of the base on the same kjv tokens: disjoint 1024-token windows.

Cumulative and segment perplexity at the streaming checkpoints, for docs/streaming.md (base_windowed.json).
"""

import json
import math

import torch
from lckv.eval.data import load_text, make_windows, tokenize
from lckv.eval.models import load_model
from lckv.eval.ppl import window_nll


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_model("bundled:smollm2-135m")
    ids = tokenize(load_text(["/work/shared/data/text/kjv.txt"])[0], tok, 20480)
    per = [(w.end, *window_nll(model, ids, [w])) for w in make_windows(len(ids), 1024, 1024)]
    out, prev = {}, 0
    for c in (2048, 8192, 20480):
        tot = sum(t for e, t, _ in per if e <= c)
        cnt = sum(n for e, _, n in per if e <= c)
        seg = sum(t for e, t, _ in per if prev < e <= c)
        seg_n = sum(n for e, _, n in per if prev < e <= c)
        out[c] = {"ppl": math.exp(tot / cnt), "segment_ppl": math.exp(seg / seg_n), "scored": cnt}
        prev = c
        print(c, out[c], flush=True)
    with open("base_windowed.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
