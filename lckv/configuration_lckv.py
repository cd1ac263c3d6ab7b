"""Configuration of LCKV Llama models: a Llama plus the map of which layer's KVs each layer reads.

Copied next to every converted checkpoint as remote code: only relative imports of our own files.
"""

from transformers import LlamaConfig

from .layout import validate_kv_sources

PREFILL_MODES = ("iterative", "sequential", "converge")


class LCKVLlamaConfig(LlamaConfig):
    r"""A `LlamaConfig` with depth-wise KV sharing.

    Args:
        kv_sources (`list[int]`, *optional*): one entry per layer, the layer whose keys and values it
            attends to. Defaults to the plain Llama layout ``[0, 1, ..., L-1]``.
        forward_passes (`int`, defaults to 7): passes without gradient over an upward-reading block (m).
        backward_passes (`int`, defaults to 2): passes with gradient after them (b).
        prefill_mode (`str`, defaults to ``"iterative"``): how a prompt is encoded: ``iterative`` (m+b
            parallel passes), ``sequential`` (token by token, exact) or ``converge`` (iterate until the
            KVs of the upward sources change by less than ``converge_tol``, at most m+b passes).
        converge_tol (`float`, defaults to 1e-3): max abs change of those KVs that ends ``converge``.
    """

    model_type = "lckv_llama"

    def __init__(
        self,
        kv_sources: list[int] | None = None,
        forward_passes: int = 7,
        backward_passes: int = 2,
        prefill_mode: str = "iterative",
        converge_tol: float = 1e-3,
        **kwargs,
    ):
        self.kv_sources = None if kv_sources is None else [int(s) for s in kv_sources]
        self.forward_passes = int(forward_passes)
        self.backward_passes = int(backward_passes)
        self.prefill_mode = prefill_mode
        self.converge_tol = float(converge_tol)
        super().__init__(**kwargs)
        if self.kv_sources is None:
            self.kv_sources = list(range(self.num_hidden_layers))
        self.kv_sources = validate_kv_sources(self.kv_sources, self.num_hidden_layers)
        if self.forward_passes < 0 or self.backward_passes < 1:
            raise ValueError(
                f"forward_passes must be >= 0 and backward_passes >= 1, got {self.forward_passes} and {self.backward_passes}"
            )
        if self.prefill_mode not in PREFILL_MODES:
            raise ValueError(f"prefill_mode {self.prefill_mode!r} is not one of {', '.join(PREFILL_MODES)}")


__all__ = ["LCKVLlamaConfig"]
