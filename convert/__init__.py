"""lckv.convert: turn a Llama checkpoint (Hub id, folder, GGUF) into an LCKV checkpoint (``lckv-convert``)."""

from .api import DEFAULT_KV_INIT, ConvertResult, convert, convert_checkpoint
from .card import append_results
from .sources import ConvertError

__all__ = ["DEFAULT_KV_INIT", "ConvertError", "ConvertResult", "append_results", "convert", "convert_checkpoint"]
