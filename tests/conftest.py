"""Shared fixtures: tiny random Llamas built in code (no network), and a small real-text tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama_config(num_layers: int = 6, vocab_size: int = 320, **overrides) -> LlamaConfig:
    """A Llama small enough for exhaustive equivalence tests (GQA on, untied by default)."""
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(num_layers: int = 6, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama with weights large enough that layers actually mix information."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_layers, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def train_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in a second on real text, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (DATA / "alice29.txt").read_text(encoding="utf-8", errors="replace")
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama checkpoint folder (safetensors + tokenizer), like a Hub download."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(num_layers=6, vocab_size=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# A fresh interpreter that cannot import lckv, as on a machine where only the checkpoint travelled: no site
# processing (so no editable-install hook), only site-packages on the path (never this repo), an import blocker
# for our package, and a check that the block holds.
_NO_LCKV_PRELUDE = """
import sys
sys.path[:] = [p for p in sys.path if p and not p.startswith({repo!r})] + {paths!r}
class _NoLckv:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lckv":
            raise ImportError("lckv is blocked in this process")
sys.meta_path.insert(0, _NoLckv())
try:
    import lckv  # noqa: F401
    sys.exit("lckv is importable")
except ImportError:
    pass
"""


def run_without_lckv(script: str, *args, cwd: Path, timeout: int = 300, **env: str):
    """Run ``script`` (with ``args`` as sys.argv[1:]) where ``import lckv`` fails; returns the CompletedProcess."""
    import site
    import subprocess
    import sys
    import textwrap

    repo = str(REPO)
    paths = [p for p in site.getsitepackages() if not p.startswith(repo)]
    prelude = _NO_LCKV_PRELUDE.format(repo=repo, paths=paths)
    full_env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(cwd), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(script), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
