"""Random routing end to end: the recipe's ``routing`` section, a routing fine-tune through ``finetune/run.py``,
and the deployment path (``lckv-convert --reshare`` to a downward layout, with the vLLM sharing map).

Real tiny models, the real Trainer, real files; one routing fine-tune (3 LoRA steps) is shared by the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lckv.convert import convert_checkpoint
from lckv.finetune.recipe import RecipeError, recipe_from_dict
from lckv.finetune.train import run
from safetensors import safe_open

from lckv import LCKVLlamaForCausalLM
from lckv.layout import is_downward, parse_layout, vllm_sharing_map
from lckv.routing import RoutingConfig, draw_layout

REPO = Path(__file__).resolve().parent.parent
TEXT = str(REPO / "tests" / "data" / "asyoulik_head.txt")
LAYERS = 6


def routing_recipe(model_dir: Path, out: Path, **routing) -> dict:
    return {
        "model": {"path": str(model_dir), "warmup": "plain"},
        "data": {"sources": [{"path": TEXT}], "block_size": 32, "max_eval_blocks": 4},
        "method": {"type": "lora", "lora": {"r": 4, "lora_alpha": 8}},
        "routing": {"p_share": 0.5, "source": "uniform_preceding", **routing},
        "train": {
            "max_steps": 3,
            "batch_size": 2,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 100,
            "seed": 7,
            "lr_scheduler": "constant",
        },  # fmt: skip
        "eval": {"report": False, "before": False},
        "output": {"dir": str(out)},
    }


def tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            names |= set(s.keys())
    return names


# ----------------------------------------------------------------------------------------------------------------
# recipe validation (no model is loaded)


def test_routing_section_validation(tmp_path, tiny_llama_dir):
    r = recipe_from_dict(routing_recipe(tiny_llama_dir, tmp_path / "o"))
    assert r.routing.p_share == 0.5 and r.routing.seed is None  # seed null: train.seed is used
    assert recipe_from_dict({**routing_recipe(tiny_llama_dir, tmp_path / "o"), "routing": None}).routing is None
    ok = routing_recipe(tiny_llama_dir, tmp_path / "o", source="kv_layers_of", layouts=["cla:2", "cla:3"], seed=3)
    assert recipe_from_dict(ok).routing.layouts == ["cla:2", "cla:3"]

    bad = routing_recipe(tiny_llama_dir, tmp_path / "o", p_share=1.5, source="random")
    bad["model"]["warmup"] = "sandwich:2"
    bad["routing"]["typo"] = 1
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(bad)
    msg = str(e.value)
    assert "`routing.p_share` must be in [0, 1], got 1.5" in msg
    assert "`routing.source`: 'random' is not one of uniform_preceding, previous, kv_layers_of" in msg
    assert "unknown key `routing.typo`" in msg
    assert "`model.warmup`: routing needs every layer's k/v projections, but 'sandwich:2' drops some" in msg
    with pytest.raises(RecipeError, match="kv_layers_of draws from the KV layers of layouts"):
        recipe_from_dict(routing_recipe(tiny_llama_dir, tmp_path / "o", source="kv_layers_of"))
    with pytest.raises(RecipeError, match=r"`routing.layouts\[0\]`: 'sandwich:2' reads layers above"):
        recipe_from_dict(routing_recipe(tiny_llama_dir, tmp_path / "o", source="kv_layers_of", layouts=["sandwich:2"]))
    with pytest.raises(RecipeError, match="applies to routing.source kv_layers_of only"):
        recipe_from_dict(routing_recipe(tiny_llama_dir, tmp_path / "o", layouts=["cla:2"]))
    # an explicit identity list is plain too
    plain_list = routing_recipe(tiny_llama_dir, tmp_path / "o")
    plain_list["model"]["warmup"] = ",".join(str(i) for i in range(LAYERS))
    assert recipe_from_dict(plain_list).routing is not None


def test_routing_refuses_a_checkpoint_without_all_kv_projections(tmp_path, tiny_llama_dir):
    lckv_dir = tmp_path / "s2"
    convert_checkpoint(str(tiny_llama_dir), "sandwich:2", lckv_dir, check=False)
    d = routing_recipe(lckv_dir, tmp_path / "o")
    del d["model"]["warmup"]  # an already converted checkpoint: only known once its config is read
    missing = sorted(set(range(LAYERS)) - set(parse_layout("sandwich:2", LAYERS)))
    with pytest.raises(
        RecipeError, match=rf"`routing`: the model lacks k/v projections of layers \[{', '.join(map(str, missing))}\]"
    ):
        run(recipe_from_dict(d))


# ----------------------------------------------------------------------------------------------------------------
# one routing fine-tune through the CLI, then deployment


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_llama_dir) -> Path:
    """Output folder of a 3-step routing LoRA fine-tune run with ``python finetune/run.py``."""
    tmp = tmp_path_factory.mktemp("routed")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(routing_recipe(tiny_llama_dir, tmp / "out")))
    proc = subprocess.run([sys.executable, str(REPO / "finetune" / "run.py"), str(path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def test_routing_finetune_logs_seeded_downward_layouts(routed):
    draws = [json.loads(line) for line in (routed / "routing_log.jsonl").read_text().splitlines()]
    assert [d["step"] for d in draws] == [0, 1, 2]
    cfg = RoutingConfig(p_share=0.5, source="uniform_preceding", seed=7)  # seed null -> train.seed
    for d in draws:
        assert d["kv_sources"] == draw_layout(cfg, LAYERS, d["step"])  # reproducible from (seed, step)
        assert is_downward(d["kv_sources"]) and d["kv_sources"][0] == 0
    assert len({tuple(d["kv_sources"]) for d in draws}) > 1  # a fresh draw each step
    # the trained checkpoint keeps every layer's k/v projections, and is still a plain model
    model_dir = routed / "model"
    names = tensor_names(model_dir)
    for i in range(LAYERS):
        assert (
            f"model.layers.{i}.self_attn.k_proj.weight" in names
            and f"model.layers.{i}.self_attn.v_proj.weight" in names
        )
    cfg_json = json.loads((model_dir / "config.json").read_text())
    assert cfg_json["kv_sources"] == list(range(LAYERS)) and cfg_json["vllm_kv_sharing"] == {}


def test_reshare_drops_unused_kv_and_matches_the_routed_model(routed, tmp_path):
    src = routed / "model"
    out = tmp_path / "cla2"
    convert_checkpoint(str(src), "cla:2", out, reshare=True, check=False)
    before, after = tensor_names(src), tensor_names(out)
    unused = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (1, 3, 5) for p in ("k", "v")}
    assert before - after == unused and after <= before
    with (
        safe_open(str(next(src.glob("*.safetensors"))), "pt") as a,
        safe_open(str(next(out.glob("*.safetensors"))), "pt") as b,
    ):
        for name in sorted(after)[:40]:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kv_sources"] == [0, 0, 2, 2, 4, 4]
    assert cfg["vllm_kv_sharing"] == {"1": 0, "3": 2, "5": 4}
    assert {int(k): v for k, v in cfg["vllm_kv_sharing"].items()} == vllm_sharing_map(cfg["kv_sources"])

    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    full = LCKVLlamaForCausalLM.from_pretrained(src).eval()
    shared = LCKVLlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = full(ids, kv_sources=parse_layout("cla:2", LAYERS)).logits
        got = shared(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert shared.model.num_kv_layers == 3

    # an upward (LCKV) layout has no vLLM map: it needs lckv's model code
    up = tmp_path / "s1"
    convert_checkpoint(str(src), "sandwich:1", up, reshare=True, check=False)
    assert "vllm_kv_sharing" not in json.loads((up / "config.json").read_text())


def test_restart_keeps_each_step_once_in_the_routing_log(tmp_path):
    from lckv.finetune.train import _prune_routing_log

    log = tmp_path / "routing_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "kv_sources": [0, 0]}) + "\n" for s in (0, 1, 2, 3, 2)))
    _prune_routing_log(log, 2)  # resumed from checkpoint-2: steps 2.. are drawn again
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0, 1]
    _prune_routing_log(log, 0)  # a fresh start
    assert log.read_text() == ""
