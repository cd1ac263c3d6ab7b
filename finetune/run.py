"""Entry point: ``deepspeed finetune/run.py recipes/X.yaml [key=value ...]`` (also ``python`` and ``torchrun``).

Thin on purpose: the logic lives in the installed ``lckv.finetune`` package.
"""

import sys
from pathlib import Path

# run as a script, this folder is sys.path[0]: drop it so its modules never shadow installed packages
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]

try:
    from lckv.finetune.cli import main
except ImportError as e:  # pragma: no cover - depends on the environment
    sys.exit(f"error: cannot import lckv.finetune ({e}); install the package: pip install -e '.[finetune]'")

if __name__ == "__main__":
    sys.exit(main())
