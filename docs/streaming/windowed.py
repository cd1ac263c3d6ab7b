"""Ordinary (non-streaming) perplexity of the base on the same kjv tokens: disjoint 1024-token windows."""

import json, math, torch

torch.set_num_threads(1)
from lckv.eval.models import load_model
from lckv.eval.data import load_text, tokenize, make_windows
from lckv.eval.ppl import window_nll

m, tok = load_model("bundled:smollm2-135m")
ids = tokenize(load_text(["/work/shared/data/text/kjv.txt"])[0], tok, 20480)
per = [(w.end, *window_nll(m, ids, [w])) for w in make_windows(len(ids), 1024, 1024)]
out = {}
prev = 0
for c in (2048, 8192, 20480):
    tot = sum(t for e, t, n in per if e <= c)
    cnt = sum(n for e, t, n in per if e <= c)
    st = sum(t for e, t, n in per if prev < e <= c)
    sc = sum(n for e, t, n in per if prev < e <= c)
    out[c] = {"ppl": math.exp(tot / cnt), "segment_ppl": math.exp(st / sc), "scored": cnt}
    prev = c
    print(c, out[c], flush=True)
json.dump(out, open("/tmp/streamrun/windowed.json", "w"), indent=1)
