"""lckv-eval: windowed perplexity, LCKV modes against an independent reference, KV accounting, reports and CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import DATA, tiny_llama
from lckv.eval import bench as B
from lckv.eval.cli import main
from lckv.eval.data import DataError, load_text, make_windows, parse_hub_spec, tokenize
from lckv.eval.models import convert_in_memory, load_model
from lckv.eval.ppl import kv_convergence, perplexity, recovery
from reference import reference_logits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------- windowing


@pytest.mark.parametrize("n,window,stride", [(10, 4, 4), (10, 4, 2), (11, 5, 3), (7, 8, 8), (9, 4, 1), (2, 2, 2)])
def test_windows_score_each_token_once(n, window, stride):
    windows = make_windows(n, window, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored)), "a token is scored twice"
    assert all(w.begin < w.score_from <= w.end - 1 < n for w in windows)  # every scored token has context
    assert all(w.length <= window for w in windows)
    assert windows[-1].end == n
    if stride < window:  # overlapping windows: every token but the first is scored
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows: the first token of each window is context only
        assert sorted(scored) == [p for p in range(1, n) if p % window != 0]


def test_windows_match_hf_guide_on_a_worked_example():
    # HF guide, window 6, stride 4, 14 tokens: windows [0,6) [4,10) [8,14); targets 6, 4, 4 (first shifted out)
    w = make_windows(14, 6, 4)
    assert [(x.begin, x.end, x.score_from) for x in w] == [(0, 6, 1), (4, 10, 6), (8, 14, 10)]


def test_window_arguments_are_checked():
    with pytest.raises(DataError, match="stride"):
        make_windows(100, 8, 9)
    with pytest.raises(DataError, match="window"):
        make_windows(100, 1, 1)
    with pytest.raises(DataError, match="at least 2"):
        make_windows(1, 8, 8)


def test_data_loading_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_text([str(tmp_path / "empty.txt")])
    with pytest.raises(DataError, match="hub:NAME"):
        parse_hub_spec("hub:wikitext")
    assert parse_hub_spec("hub:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hub_spec("hub:org/data:validation") == ("org/data", None, "validation")


def test_hub_dataset_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_text(["hub:lckv-test-no-such-org/no-such-data:train"])
    msg = str(e.value)
    assert "\n" not in msg and "--data FILE" in msg


def test_tokenize_max_tokens(tiny_tokenizer):
    text, names = load_text([str(DATA / "alice29.txt")])
    assert names == [str(DATA / "alice29.txt")]
    ids = tokenize(text, tiny_tokenizer, 300)
    full = tiny_tokenizer(text[:5000], add_special_tokens=False)["input_ids"]
    assert ids == full[:300]


# --------------------------------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def base():
    return tiny_llama(6, seed=0)


@pytest.fixture(scope="module")
def tokens(tiny_tokenizer):
    text, _ = load_text([str(DATA / "alice29.txt")])
    return tokenize(text, tiny_tokenizer, 400)


def naive_ppl(logits_fn, tokens, window, stride):
    """Perplexity written out directly: for each window, the NLL of the tokens it is responsible for."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        ids = torch.tensor([tokens[begin:end]])
        logits = logits_fn(ids)[0].double()
        for p in range(max(begin + 1, prev_end), end):
            row = logits[p - begin - 1]
            nll += (torch.logsumexp(row, 0) - row[tokens[p]]).item()
            count += 1
        prev_end = end
        if end == len(tokens):
            break
    return math.exp(nll / count), count


def test_base_llama_ppl_equals_naive(base, tokens):
    got = perplexity(base, tokens, window=48, stride=32, batch_size=3)
    with torch.no_grad():
        want, count = naive_ppl(lambda x: base(x).logits, tokens, 48, 32)
    assert got["scored_tokens"] == count == len(tokens) - 1
    assert got["ppl"] == pytest.approx(want, rel=1e-6)


def test_plain_layout_ppl_equals_base_llama(base, tokens):
    plain = convert_in_memory(base, "plain")
    want = perplexity(base, tokens, window=64, stride=64, batch_size=4)["ppl"]
    for mode in ("iterative", "sequential", "converge"):
        assert perplexity(plain, tokens, window=64, stride=64, mode=mode, batch_size=4)["ppl"] == pytest.approx(
            want, rel=1e-6
        )


def test_sequential_ppl_equals_independent_reference(base, tokens):
    """sequential (exact) mode == the naive token-by-token LCKV definition in tests/reference.py."""
    model = convert_in_memory(base, "sandwich:2")
    toks = tokens[:60]
    got = perplexity(model, toks, window=24, stride=16, mode="sequential", batch_size=2)
    want, count = naive_ppl(lambda x: reference_logits(model, x, model.config.kv_sources), toks, 24, 16)
    assert got["scored_tokens"] == count
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    # the iterative mode with too few passes for a 24-token window is not exact, and the tool shows the gap
    model.config.forward_passes, model.config.backward_passes = 1, 1
    iterative = perplexity(model, toks, window=24, stride=16, mode="iterative", batch_size=2)
    assert abs(iterative["ppl"] - got["ppl"]) > 1e-3 * got["ppl"]


def test_kv_convergence_reaches_the_sequential_fixed_point(base, tokens):
    model = convert_in_memory(base, "sandwich:2", forward_passes=4, backward_passes=2)
    conv = kv_convergence(model, tokens, window=12, num_windows=2)
    assert conv["passes"] == [1, 2, 3, 4, 5, 6] and conv["fixed_point_passes"] == 12
    assert conv["mse"][0] > conv["mse"][-1] >= 0 and set(conv["mse_by_source"]) == {4}
    assert model.config.forward_passes == 4  # restored
    # the fixed point is the exact model: the KVs a sequential prefill caches for the upward source (layer 4)
    full = kv_convergence(model, tokens, window=12, num_windows=1, passes=12)
    assert full["mse"][-1] == 0.0
    x = torch.tensor([tokens[:12]])
    with torch.no_grad():
        cache = model(x, prefill_mode="sequential", use_cache=True).past_key_values
        trace = model(x, prefill_mode="iterative", output_pass_kvs=True, use_cache=False)
    slot = sorted(set(model.config.kv_sources)).index(4)
    # with m+b = 6 passes the first 6 tokens are exact already
    assert torch.allclose(trace.pass_kvs[-1][4][0][..., :6, :], cache.layers[slot].keys[..., :6, :], atol=1e-5)
    assert (
        kv_convergence(base, tokens, 12) is None
        and kv_convergence(convert_in_memory(base, "cla:2"), tokens, 12) is None
    )


def test_recovery_formula():
    res = lambda loss: {"modes": {"sequential": {"loss": loss, "ppl": math.exp(loss)}}}  # noqa: E731
    base = {"modes": {"base": {"loss": 2.0, "ppl": math.exp(2.0)}}}
    r = recovery(res(2.5), base, res(4.0))["sequential"]
    assert r["loss_recovery"] == pytest.approx(0.75)
    assert r["ppl_ratio"] == pytest.approx(math.exp(0.5))
    assert recovery(res(2.5), base, None)["sequential"]["loss_recovery"] is None


# --------------------------------------------------------------------------------------------------- bench pieces


def test_kv_bytes_per_token_from_cache_match_layout(base):
    toks = list(range(3, 300))
    ref = B.kv_bytes_per_token(B.BenchModel("base", "base", base), toks)
    assert ref["agree"] and ref["cache"] == 2 * 6 * 2 * 16 * 4  # 2 x L x kv heads x head dim x fp32
    for spec, n_kv in (("sandwich:2", 3), ("cla:2", 3), ("cla:3", 2), ("plain", 6)):
        bm = B.BenchModel(spec, spec, convert_in_memory(base, spec))
        kv = B.kv_bytes_per_token(bm, toks)
        assert kv["agree"], kv
        assert kv["cache_layers_holding_kv"] == n_kv
        assert kv["cache"] == pytest.approx(n_kv / 6 * ref["cache"])


def test_peak_memory_sees_torch_allocations():
    if not B.cpu_memory_method_available():
        pytest.skip("no /proc/self/clear_refs here")
    with B.PeakMemory("cpu") as small:
        torch.ones(1 << 16).sum()
    with B.PeakMemory("cpu") as big:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        del x
    assert big.peak_bytes >= 60 << 20 and small.peak_bytes < 16 << 20


# --------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def lckv_dirs(tmp_path_factory, tiny_llama_dir):
    """A converted LCKV folder (with its remote code) and a LoRA adapter trained-ish on top of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lckv-eval")
    base, tok = load_model(tiny_llama_dir)
    conv = convert_in_memory(base, "sandwich:2")
    conv.save_pretrained(root / "converted")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(root / "converted")
    reloaded, _ = load_model(root / "converted")
    peft_model = get_peft_model(reloaded, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_alpha=8))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a non-zero adapter, so the merge changes the model
    peft_model.save_pretrained(root / "adapter")
    return root


def test_ppl_cli_writes_every_field(tmp_path, tiny_llama_dir, lckv_dirs, capsys):
    out = tmp_path / "ppl-out"
    args = ["ppl", str(lckv_dirs / "adapter"), "--base", str(tiny_llama_dir), "--converted",
            str(lckv_dirs / "converted"), "--data", str(DATA / "alice29.txt"), "--window", "32", "--max-tokens",
            "200", "--modes", "iterative,sequential,converge", "--kv-window", "16", "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "loss recovery" in printed and "Iterative vs sequential" in printed
    r = json.loads((out / "ppl.json").read_text())
    assert {"command", "argv", "environment", "data", "models", "recovery", "kv_convergence"} <= set(r)
    assert {"torch", "transformers", "device", "torch_threads", "python"} <= set(r["environment"])
    assert r["data"]["num_tokens"] == 200 and r["data"]["scored_tokens"] == 200 - 7
    assert set(r["models"]) == {"model", "base", "converted"}
    assert set(r["models"]["model"]["modes"]) == {"iterative", "sequential", "converge"}
    assert set(r["models"]["base"]["modes"]) == {"base"}
    for key in ("ppl_iterative_minus_sequential", "relative_ppl"):
        assert key in r["models"]["model"]["gap"]
    for mode in ("iterative", "sequential", "converge"):
        e = r["recovery"][mode]
        assert {"loss_recovery", "ppl_ratio", "loss_model", "loss_converted", "loss_base"} <= set(e)
        assert e["loss_recovery"] is not None
    assert r["kv_convergence"]["model"]["passes"] == list(range(1, 10))
    assert (out / "ppl.md").is_file() and (out / "kv_convergence.png").stat().st_size > 1000
    # the adapter was merged: its perplexity differs from the converted model's it was trained from
    assert r["models"]["model"]["modes"]["sequential"]["ppl"] != r["models"]["converted"]["modes"]["sequential"]["ppl"]
    # existing output is not silently replaced
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_ppl_of_remote_code_checkpoint_equals_installed_classes(tmp_path, lckv_dirs, capsys):
    res = {}
    for flag in ([], ["--trust-remote-code"]):
        out = tmp_path / f"o{len(flag)}"
        args = ["ppl", str(lckv_dirs / "converted"), "--data", str(DATA / "asyoulik_head.txt"), "--window", "32",
                "--max-tokens", "96", "--kv-windows", "0", "--out", str(out), "-q", *flag]  # fmt: skip
        assert main(args) == 0
        r = json.loads((out / "ppl.json").read_text())
        res[bool(flag)] = r["models"]["model"]
    assert res[True]["class"] == res[False]["class"] == "LCKVLlamaForCausalLM"
    assert res[True]["modes"]["sequential"]["ppl"] == pytest.approx(res[False]["modes"]["sequential"]["ppl"], rel=1e-6)


def test_bench_cli_writes_every_field(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "bench-out"
    args = ["bench", str(tiny_llama_dir), "convert:sandwich:2", "convert:cla:2", "--batch-sizes", "1,2",
            "--lengths", "16,24", "--budget-gb", "0.02", "--budget-length", "48", "--prompt-len", "24",
            "--repeats", "1", "--data", str(DATA / "alice29.txt"), "--ppl-tokens", "130", "--threads", "1",
            "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "KV B/token (cache)" in printed
    r = json.loads((out / "bench.json").read_text())
    for key in ("command", "argv", "environment", "settings", "memory_method", "model_names", "models",
                "memory_grid", "max_batch", "ttft", "ppl"):  # fmt: skip
        assert key in r, key
    assert r["model_names"] == ["base", "sandwich:2", "cla:2"]
    kv = {m["name"]: m["kv_bytes_per_token"] for m in r["models"]}
    assert all(v["agree"] for v in kv.values())
    assert kv["sandwich:2"]["cache"] == kv["base"]["cache"] / 2
    assert len(r["memory_grid"]) == 3 * 2 * 2
    for g in r["memory_grid"]:
        assert {"peak_bytes", "kv_cache_bytes_at_end", "decode_tokens_per_s", "ttft_s", "batch", "length"} <= set(g)
        assert g["decode_tokens_per_s"] > 0
    for m in r["max_batch"]:
        assert m["max_batch"] >= 1 and m["decode_tokens_per_s"] > 0 and m["probes"]
        assert m["method"] == "cpu-rss" and m["weights_bytes"] + m["peak_bytes"] <= m["budget_bytes"]
        assert m["kv_cache_bytes"] < m["peak_bytes"]
        too_big = [p for p in m["probes"] if p["batch"] > m["max_batch"]]
        assert all(not p["fits"] for p in too_big)
    modes = {(t["model"], t["mode"]) for t in r["ttft"]}
    assert ("base", "base") in modes and {("sandwich:2", m) for m in ("iterative", "sequential", "converge")} <= modes
    assert {p["model"] for p in r["ppl"]} == {"base", "sandwich:2", "cla:2"}
    for name in ("bench.md", "throughput_vs_batch.png", "memory_vs_length.png", "ppl_vs_kv.png"):
        assert (out / name).stat().st_size > 100, name


@pytest.mark.parametrize("case", ["missing", "empty", "hub-offline", "bad-window"])
def test_cli_errors_are_one_line(tmp_path, tiny_llama_dir, case, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    data = {"missing": str(tmp_path / "nope.txt"), "empty": str(empty), "hub-offline": "hub:no-org/no-data:test"}
    args = [
        "ppl",
        str(tiny_llama_dir),
        "--data",
        data.get(case, str(DATA / "alice29.txt")),
        "--out",
        str(tmp_path / "o"),
    ]
    if case == "bad-window":
        args += ["--window", "8", "--stride", "9"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lckv-eval: error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_console_script_bad_model_path(tmp_path):
    """The installed entry point: a missing model folder is one line on stderr and exit status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "lckv.eval.cli", "ppl", str(tmp_path / "no-model"), "--data", str(DATA / "alice29.txt"),
         "--out", str(tmp_path / "o")],  # fmt: skip
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == f"lckv-eval: error: model path {tmp_path / 'no-model'} does not exist"
    )


@pytest.mark.parametrize("kv_init", ["top", "mean"])
def test_in_memory_conversion_equals_lckv_convert(tmp_path, tiny_llama_dir, kv_init):
    """bench's convert:LAYOUT models are exactly what lckv-convert writes."""
    from lckv.convert import convert_checkpoint

    folder = convert_checkpoint(str(tiny_llama_dir), "sandwich:2", tmp_path / "c", kv_init=kv_init, check=False)
    written, _ = load_model(folder)
    base, _ = load_model(tiny_llama_dir)
    mine = convert_in_memory(base, "sandwich:2", kv_init=kv_init)
    a, b = mine.state_dict(), written.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mine.config.kv_sources == written.config.kv_sources


# --------------------------------------------------------------------------------------------------- streaming


def _sequential_nll(model, ids: list[int]) -> float:
    """Mean NLL of tokens 1..n-1 of one window with the exact (sequential) model, no streaming."""
    from lckv.eval.data import Window
    from lckv.eval.ppl import window_nll

    mode = "sequential" if getattr(model.config, "kv_sources", None) is not None else None
    total, count = window_nll(model, ids, [Window(0, len(ids), 1)], mode=mode)
    return total / count


@pytest.fixture(scope="module")
def stream_base():
    return tiny_llama(6, seed=3)


@pytest.mark.parametrize("spec", ["llama", "sandwich:2", "top:2", "cla:2"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_streaming_ppl_with_a_large_window_equals_ordinary_ppl(stream_base, spec, chunk):
    from lckv.eval.stream import streaming_perplexity

    model = stream_base if spec == "llama" else convert_in_memory(stream_base, spec)
    ids = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    r = streaming_perplexity(model, ids, sink=4, window=64, chunk=chunk, checkpoints=[10, 25])
    assert r["exact"] and [c["tokens"] for c in r["checkpoints"]] == [10, 25, 40]
    last = r["checkpoints"][-1]
    assert last["scored_tokens"] == 39 and r["checkpoints"][0]["scored_tokens"] == 10
    assert abs(last["loss"] - _sequential_nll(model, ids)) <= 1e-5
    assert last["cache_tokens"] == 39  # the last token is never fed: nothing is left to predict


@pytest.mark.parametrize("spec", ["plain", "sandwich:2"])
def test_streaming_ppl_equals_reference_on_sinks_plus_window(stream_base, spec):
    """Chunk 1 is exact StreamingLLM: every NLL equals the naive oracle's on the truncated (sinks + window) context."""
    from lckv.eval.stream import streaming_perplexity

    model = convert_in_memory(stream_base, spec)
    ids = torch.randint(3, 320, (1, 30), generator=torch.Generator().manual_seed(5))
    ref = reference_logits(model, ids, model.config.kv_sources, sink=2, window=6)[0, :-1]
    nll = -torch.log_softmax(ref.double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    r = streaming_perplexity(model, ids[0].tolist(), sink=2, window=6, chunk=1, checkpoints=[12])
    assert abs(r["checkpoints"][0]["loss"] - nll[:12].mean().item()) <= 1e-5
    assert abs(r["checkpoints"][-1]["loss"] - nll.mean().item()) <= 1e-5
    assert abs(r["checkpoints"][-1]["loss"] - _sequential_nll(model, ids[0].tolist())) > 1e-4  # truncation matters


@pytest.mark.parametrize("spec,chunk", [("llama", 1), ("llama", 4), ("sandwich:2", 1), ("cla:2", 3)])
def test_streaming_cache_never_exceeds_sinks_plus_window(stream_base, spec, chunk):
    from lckv.eval.stream import streaming_perplexity

    from lckv import parse_layout

    model = stream_base if spec == "llama" else convert_in_memory(stream_base, spec)
    kv_layers = len(set(parse_layout("plain" if spec == "llama" else spec, 6)))
    per_token = 2 * kv_layers * 2 * 16 * 4  # K and V x KV layers x 2 KV heads x head dim 16 x fp32
    r = streaming_perplexity(model, list(range(3, 63)), sink=2, window=8, chunk=chunk, checkpoints=[20, 40])
    assert r["kv_layers"] == kv_layers and r["cache_bound_bytes"] == 10 * per_token
    for c in r["checkpoints"]:
        assert c["max_cache_bytes"] <= 10 * per_token and c["max_cache_tokens"] <= 10
        assert c["cache_bytes"] == 10 * per_token and c["cache_layers"] == kv_layers
        assert c["segment_peak_bytes"] is None or c["segment_peak_bytes"] > 0
    assert r["exact"]


def test_streaming_api_errors(stream_base):
    from lckv.eval.stream import StreamSpecError, parse_stream_spec, streaming_perplexity

    assert parse_stream_spec("sink=4,window=1024") == (4, 1024)
    assert parse_stream_spec(" window=16 ") == (4, 16)
    for bad in ["", "sink=4", "window=0", "sink=-1,window=8", "window=8,window=9", "win=8", "sink=4;window=8"]:
        with pytest.raises(StreamSpecError, match="sink=N,window=M"):
            parse_stream_spec(bad)
    with pytest.raises(StreamSpecError, match="chunk"):
        streaming_perplexity(stream_base, [1, 2, 3], 2, 4, chunk=0)
    # an upward layout with chunks longer than m+b passes is flagged as approximate
    r = streaming_perplexity(convert_in_memory(stream_base, "sandwich:2"), list(range(3, 30)), 2, 4, chunk=12)
    assert not r["exact"]


def test_stream_cli_equals_ordinary_ppl_and_reports_memory(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "s"
    args = ["ppl", "convert:sandwich:2", "--base", str(tiny_llama_dir), "--data", str(DATA / "alice29.txt"),
            "--max-tokens", "120", "--stream", "sink=4,window=512", "--base-stream-chunk", "7",
            "--checkpoints", "50", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads((out / "ppl.json").read_text())
    assert r["stream"] == {"sink": 4, "window": 512, "checkpoints": [50]}
    assert list(r["models"]) == ["model", "base"]
    base, tok = load_model(tiny_llama_dir)
    ids = tokenize(load_text([str(DATA / "alice29.txt")])[0], tok, 120)
    assert r["data"]["num_tokens"] == 120
    for role, chunk in (("base", 7), ("model", 1)):
        s = r["models"][role]["stream"]
        assert s["chunk"] == chunk and [c["tokens"] for c in s["checkpoints"]] == [50, 120]
        model = base if role == "base" else convert_in_memory(base, "sandwich:2")
        assert abs(s["checkpoints"][-1]["loss"] - _sequential_nll(model, ids)) <= 1e-5
        assert all(c["segment_peak_bytes"] is None or c["segment_peak_bytes"] > 0 for c in s["checkpoints"])
    assert r["models"]["model"]["num_kv_layers"] == 3 and r["models"]["base"]["num_kv_layers"] == 6
    md = (out / "ppl.md").read_text()
    assert "| model | convert:sandwich:2 | 3/6 | 1 | 120 |" in md and "cache bound" in md
    assert "Streaming perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra", [["--stream", "sink=4"], ["--stream", "window=x"], ["--stream", "window=8", "--stream-chunk", "0"]]
)
def test_stream_cli_errors_are_one_line(tmp_path, tiny_llama_dir, extra, capsys):
    args = ["ppl", str(tiny_llama_dir), "--data", str(DATA / "alice29.txt"), "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lckv-eval: error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_convert_model_needs_base(tmp_path, capsys):
    args = ["ppl", "convert:sandwich:2", "--data", str(DATA / "alice29.txt"), "--stream", "window=8"]
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    assert "pass --base" in capsys.readouterr().err
