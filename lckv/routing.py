"""Random cross-layer KV routing for training (Stochastic KV Routing / random cross-layer attention).

At every training step each layer ``i > 0`` independently, with probability ``p_share``, attends to the KVs of
a preceding layer instead of its own; the draw is seeded by (seed, step), so a resumed run draws the same
layouts, and every draw is logged. The model keeps all k/v projections; at deployment
``lckv-convert TRAINED --reshare cla:2`` picks one layout and drops the projections no layer reads.

Not part of the remote code: checkpoints never need it.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from .layout import LayoutError, parse_layout, sample_routing

logger = logging.getLogger(__name__)

SOURCES = ("uniform_preceding", "previous", "kv_layers_of")


@dataclass
class RoutingConfig:
    """Recipe section ``routing``: ``{p_share: 0.5, source: uniform_preceding, layouts: [cla:2, cla:3]}``."""

    p_share: float = 0.5
    source: str = "uniform_preceding"
    layouts: list[str] = field(default_factory=list)
    seed: int = 0

    def validate(self, num_layers: int | None = None) -> None:
        if not 0.0 <= float(self.p_share) <= 1.0:
            raise LayoutError(f"routing.p_share must be in [0, 1], got {self.p_share}")
        if self.source not in SOURCES:
            raise LayoutError(f"routing.source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source == "kv_layers_of" and not self.layouts:
            raise LayoutError("routing.source kv_layers_of needs routing.layouts, e.g. [cla:2, cla:3]")
        if num_layers is not None:
            for spec in self.layouts:
                ks = parse_layout(spec, num_layers)
                if any(s > i for i, s in enumerate(ks)):
                    raise LayoutError(
                        f"routing layout {spec!r} reads layers above: routing layouts must share downward"
                    )


def draw_layout(cfg: RoutingConfig, num_layers: int, step: int) -> list[int]:
    """The layout of one training step, reproducible from (seed, step)."""
    rng = random.Random(f"{cfg.seed}:{step}")
    layouts = [parse_layout(s, num_layers) for s in cfg.layouts] if cfg.source == "kv_layers_of" else None
    return sample_routing(num_layers, float(cfg.p_share), cfg.source, rng=rng, layouts=layouts)


def find_lckv_model(model):
    """The LCKVLlamaModel inside a (peft / deepspeed / trainer) wrapper; matched by class name because remote code
    loads its own copy of the class."""
    for module in model.modules():
        if type(module).__name__ == "LCKVLlamaModel":
            return module
    raise ValueError("routing needs an LCKV model (convert the checkpoint first); none was found in the model")


class RoutingCallback(TrainerCallback):
    """Sets a freshly drawn layout on the model before every optimizer step and logs it to ``routing_log.jsonl``."""

    def __init__(self, cfg: RoutingConfig, log_path: str | Path | None = None):
        self.cfg = cfg
        self.log_path = Path(log_path) if log_path else None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        inner = find_lckv_model(model)
        layout = draw_layout(self.cfg, inner.config.num_hidden_layers, state.global_step)
        inner.routing_kv_sources = layout
        if self.log_path is not None and state.is_world_process_zero:
            with self.log_path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "kv_sources": layout}) + "\n")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        find_lckv_model(model).routing_kv_sources = None
