"""Command line of the fine-tuning entry point (``finetune/run.py``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .recipe import RecipeError, load_recipe

EPILOG = """examples:
  deepspeed finetune/run.py recipes/smollm2-135m-sandwich2-lora.yaml
  deepspeed --num_gpus 8 finetune/run.py recipes/llama3-8b-sandwich2-lora-zero3.yaml train.max_steps=2000
  torchrun --nproc_per_node 2 finetune/run.py recipes/X.yaml deepspeed.zero=null
  python finetune/run.py recipes/X.yaml output.dir=runs/try1 --dry-run

Overrides are dotted recipe keys (list items by index: data.sources.0.path=my.txt). Restarting the
same command resumes from the last checkpoint in output.dir. See docs/finetune.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune/run.py",
        description="Fine-tune an LCKV model from a recipe YAML (full, LoRA or QLoRA; LM or distillation loss).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. train.max_steps=100")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print it resolved, and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(recipe.to_yaml(), end="")
        return 0

    from .data import DataError
    from .model import ModelError
    from .train import TrainingError, run, summary_table

    try:
        results = run(recipe)
    except (RecipeError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if rank == 0:
        print(f"\nfine-tuning finished: {recipe.output.dir}\n{summary_table(results)}")
    return 0


__all__ = ["build_parser", "main"]
