"""lckv.finetune: fine-tune LCKV models from a recipe YAML with the HF Trainer (``finetune/run.py``).

    from lckv.finetune import load_recipe, run
    results = run(load_recipe("recipes/smollm2-135m-sandwich2-lora.yaml", ["train.max_steps=10"]))

Heavy imports (torch, transformers, deepspeed) happen only when a run starts.
"""

from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict


def run(recipe: Recipe, callbacks: list | None = None) -> dict:
    """Run a validated recipe end to end (see :func:`lckv.finetune.train.run`)."""
    from .train import run as _run

    return _run(recipe, callbacks)


__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "run"]
