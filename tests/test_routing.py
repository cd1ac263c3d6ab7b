"""Random cross-layer routing: seeded per-step layouts, applied through a real HF Trainer run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from test_modeling import lckv_from_llama
from transformers import Trainer, TrainingArguments

from lckv.layout import LayoutError
from lckv.routing import RoutingCallback, RoutingConfig, draw_layout


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, n=8, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 320, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path, routing: RoutingConfig | None, steps=3):
    model = lckv_from_llama(tiny_llama(4, seed=3), "plain")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    callbacks = [RoutingCallback(routing, tmp_path / "routing_log.jsonl")] if routing else []
    trainer = Trainer(model=model, args=args, train_dataset=_Repeat(), callbacks=callbacks)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, model


def test_p_share_zero_is_ordinary_training(tmp_path):
    plain, _ = _train(tmp_path / "a", None)
    routed, model = _train(tmp_path / "b", RoutingConfig(p_share=0.0, seed=1))
    assert plain == routed
    log = [json.loads(x) for x in (tmp_path / "b" / "routing_log.jsonl").read_text().splitlines()]
    assert [r["kv_sources"] for r in log] == [[0, 1, 2, 3]] * 3
    assert model.model.routing_kv_sources is None  # cleared after training


def test_p_share_one_previous_reads_layer_below(tmp_path):
    losses, _ = _train(tmp_path, RoutingConfig(p_share=1.0, source="previous"))
    log = [json.loads(x) for x in (tmp_path / "routing_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(r["kv_sources"] == [0, 0, 1, 2] for r in log)
    plain, _ = _train(tmp_path / "plain", None)
    assert losses[0] != plain[0]  # the routed layout was really used


def test_draws_are_seeded_valid_and_vary():
    cfg = RoutingConfig(p_share=0.5, seed=7)
    draws = [draw_layout(cfg, 12, step) for step in range(20)]
    assert draws == [draw_layout(cfg, 12, step) for step in range(20)]
    assert len({tuple(d) for d in draws}) > 5
    assert all(s <= i for d in draws for i, s in enumerate(d))
    other = [draw_layout(RoutingConfig(p_share=0.5, seed=8), 12, step) for step in range(20)]
    assert other != draws
    kv = RoutingConfig(p_share=1.0, source="kv_layers_of", layouts=["cla:2", "cla:3"])
    assert all(draw_layout(kv, 6, s) in ([0, 0, 2, 2, 4, 4], [0, 0, 0, 3, 3, 3]) for s in range(10))


def test_bad_routing_config():
    with pytest.raises(LayoutError, match="p_share"):
        RoutingConfig(p_share=2).validate()
    with pytest.raises(LayoutError, match="not one of"):
        RoutingConfig(source="random").validate()
    with pytest.raises(LayoutError, match="share downward"):
        RoutingConfig(source="kv_layers_of", layouts=["sandwich:2"]).validate(6)
