"""Convert a Llama checkpoint into an LCKV checkpoint: the Python API behind ``lckv-convert``."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..layout import LayoutError, describe, has_upward, kv_layers, parse_layout, vllm_sharing_map
from .card import CardInfo, append_results, human_bytes, kv_bytes_per_token, render_card
from .check import CHECK_MAX_PARAMS, CheckResult
from .mapping import MappingError, plan_tensors
from .sources import ConvertError, Source, copy_side_files, llama_kwargs, resolve_source
from .writer import DEFAULT_MAX_SHARD_BYTES, OutTensor, assign_shards, shard_names, write_index, write_shard

logger = logging.getLogger(__name__)

# chosen by measurement on the bundled SmolLM2-135M (docs/convert.md): before fine-tuning, mean init gave
# 16x lower perplexity for sandwich:2 and 4x lower for cla:2 than top init
DEFAULT_KV_INIT = "mean"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REMOTE_CODE = ("configuration_lckv.py", "modeling_lckv.py", "layout.py")
AUTO_MAP = {
    "AutoConfig": "configuration_lckv.LCKVLlamaConfig",
    "AutoModelForCausalLM": "modeling_lckv.LCKVLlamaForCausalLM",
}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass
class ConvertResult:
    """What a conversion produced (the CLI prints it)."""

    output_dir: Path
    source: str
    layout: str
    kv_sources: list[int]
    kv_init: str
    dtype: str
    num_parameters: int
    kv_bytes_before: int
    kv_bytes_after: int
    files: list[str]
    dropped: list[str]
    output_bytes: int
    seconds: float
    check: CheckResult | None = None
    hub_url: str | None = None
    notes: list[str] = field(default_factory=list)


def convert_checkpoint(
    src: str | Path,
    layout: str | list[int],
    output_dir: str | Path,
    kv_init: str | None = None,
    overwrite: bool = False,
    check: bool | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    trust_remote_code: bool = False,
    reshare: bool = False,
    dtype: str | None = None,
) -> Path:
    """Convert ``src`` (Hub id, folder, .gguf, ``bundled:smollm2-135m``) to an LCKV checkpoint in ``output_dir``.

    ``layout`` is a layout spec (``sandwich:2``, ``bottom:w``, ``top:w``, ``cla:k``, a list of sources).
    ``kv_init``: ``top`` (KV layers keep their k/v projections) or ``mean`` (the mean of every reading
    layer's). ``check`` (default: on below 1B parameters) compares the result with the source. Raises
    ConvertError with a one-line message on bad input; never leaves a partial ``output_dir`` behind.
    """
    return convert(
        src,
        layout,
        output_dir,
        kv_init=kv_init,
        overwrite=overwrite,
        check=check,
        push_to_hub=push_to_hub,
        private=private,
        trust_remote_code=trust_remote_code,
        reshare=reshare,
        dtype=dtype,
    ).output_dir


def convert(
    src: str | Path,
    layout: str | list[int],
    output_dir: str | Path,
    kv_init: str | None = None,
    overwrite: bool = False,
    check: bool | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    trust_remote_code: bool = False,
    reshare: bool = False,
    dtype: str | None = None,
    command: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    check_tokens: int = 256,
) -> ConvertResult:
    """Like ``convert_checkpoint`` but returns a ConvertResult.

    ``command`` is recorded in the card; ``check_tokens`` is how much of the built-in text ``check`` scores.
    """
    t0 = time.time()
    output_dir = Path(output_dir).expanduser()
    _check_output(output_dir, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if push_to_hub is not None and push_to_hub.count("/") != 1:
        raise ConvertError(f"--push-to-hub {push_to_hub}: give the repository as ORG/NAME")

    source = resolve_source(str(src))
    _check_not_overwriting_source(source, output_dir)
    if source.is_lckv and not reshare:
        raise ConvertError(
            f"{src} is already an LCKV checkpoint: pass --reshare to change its layout (only layers that keep k/v "
            "projections can be KV layers)"
        )
    num_layers = source.num_layers
    spec = layout if isinstance(layout, str) else ",".join(str(s) for s in layout)
    try:
        kv_sources = parse_layout(layout, num_layers)
    except LayoutError as e:
        raise ConvertError(f"--warmup {spec}: {e}") from None
    if kv_init is None:
        kv_init = "top" if source.is_lckv else DEFAULT_KV_INIT
    logger.info("layout %s: %s", spec, describe(kv_sources))

    kw = llama_kwargs(source.config)
    tied = bool(kw.get("tie_word_embeddings", False))
    reader = source.reader()
    try:
        try:
            recipes, dropped = plan_tensors(reader.names, kv_sources, kv_init, tie_word_embeddings=tied)
        except MappingError as e:
            raise ConvertError(f"{src}: {e}") from None
        out_dtype = DTYPES.get(dtype) if dtype else None
        tensors = [
            OutTensor(r, _target_dtype(reader.info[r.sources[0]][0], out_dtype), reader.info[r.sources[0]][1])
            for r in recipes
        ]
        float_dtypes = {t.dtype for t in tensors if t.dtype.is_floating_point}
        dtype_name = str(next(iter(float_dtypes))).removeprefix("torch.") if len(float_dtypes) == 1 else None
        num_params = sum(t.nbytes // torch.empty((), dtype=t.dtype).element_size() for t in tensors)
        shards = assign_shards(tensors, reader.shard, reader.num_shards, max_shard_bytes)
        total_bytes = sum(t.nbytes for t in tensors)
        _check_free_space(output_dir.parent, total_bytes)

        config = _output_config(kw, kv_sources, dtype_name)
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        value_bytes = torch.empty((), dtype=DTYPES.get(dtype_name, torch.float32)).element_size()
        source_kv = len(kv_layers(source.config["kv_sources"])) if source.is_lckv else num_layers
        before = kv_bytes_per_token(source_kv, config.num_key_value_heads, head_dim, value_bytes)
        after = kv_bytes_per_token(len(kv_layers(kv_sources)), config.num_key_value_heads, head_dim, value_bytes)
        if check is None:
            check = num_params < CHECK_MAX_PARAMS
        if command is None:
            command = _command(src, spec, output_dir, kv_init, dtype, reshare, push_to_hub, private)

        created = _first_missing(output_dir.absolute().parent)
        try:
            tmp = _make_temp(output_dir)
        except OSError as e:
            raise ConvertError(f"cannot create {output_dir} ({e.strerror}): choose another -o") from None
        try:
            names = shard_names(len(shards))
            bar = tqdm(total=len(tensors), desc="writing tensors", unit="tensor", disable=None)
            for group, name in zip(shards, names):
                logger.info("writing %s (%d tensors)", name, len(group))
                write_shard(tmp / name, group, lambda t: _produce(reader, t), on_tensor=lambda: bar.update(1))
            bar.close()
            reader.close()
            if len(shards) > 1:
                write_index(tmp, shards, names)
            config.save_pretrained(str(tmp))
            _copy_remote_code(tmp)
            side = copy_side_files(source, tmp)
            card = CardInfo(
                title=f"{output_dir.name}: {_source_title(source)} with an LCKV `{spec}` KV cache",
                source=str(src),
                base_model=source.hub_id,
                license=source.license,
                layout_spec=spec,
                kv_sources=kv_sources,
                source_kv_layers=source_kv,
                num_kv_heads=config.num_key_value_heads,
                head_dim=head_dim,
                dtype=dtype_name or "mixed",
                bytes_per_value=value_bytes,
                kv_init=kv_init,
                command=command,
                load_path=push_to_hub or str(output_dir),
                num_parameters=num_params,
            )
            (tmp / "README.md").write_text(render_card(card))

            result_check = None
            if check:
                result_check = _run_check(source, reader, tmp, side, trust_remote_code, check_tokens)
                if result_check is not None:
                    append_results(tmp, "Conversion check (before fine-tuning)", result_check.rows())
            _move_into_place(tmp, output_dir)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty_parents(output_dir.absolute().parent, created)
            if isinstance(e, OSError) and e.errno in _DISK_FULL:
                raise ConvertError(
                    f"disk full while writing {output_dir} ({e.strerror}): free at least {human_bytes(total_bytes)} "
                    "there or choose another -o; the temporary folder was removed"
                ) from None
            raise
    finally:
        reader.close()

    result = ConvertResult(
        output_dir=output_dir,
        source=str(src),
        layout=spec,
        kv_sources=kv_sources,
        kv_init=kv_init,
        dtype=dtype_name or "mixed",
        num_parameters=num_params,
        kv_bytes_before=before,
        kv_bytes_after=after,
        files=sorted(p.name for p in output_dir.iterdir()),
        dropped=dropped,
        output_bytes=sum(p.stat().st_size for p in output_dir.iterdir() if p.is_file()),
        seconds=time.time() - t0,
        check=result_check,
    )
    if push_to_hub:
        from .hub import push_folder

        result.hub_url = push_folder(
            output_dir, push_to_hub, private=private, commit_message=f"lckv-convert: {command}"
        )
    return result


# ---------------------------------------------------------------------------------------------------------------


def _target_dtype(source_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if (requested is not None and source_dtype.is_floating_point) else source_dtype


def _produce(reader, t: OutTensor) -> torch.Tensor:
    """One output tensor: a copy, or the float32 mean of the reading layers' projections."""
    if not t.recipe.is_mean:
        return reader.get(t.recipe.sources[0]).to(t.dtype)
    acc = None
    for name in t.recipe.sources:
        x = reader.get(name).to(torch.float32)
        acc = x.clone() if acc is None else acc.add_(x)
    return (acc / len(t.recipe.sources)).to(t.dtype)


def _output_config(kw: dict, kv_sources: list[int], dtype_name: str | None):
    from .. import LCKVLlamaConfig

    kw = dict(kw)
    kw["kv_sources"] = kv_sources
    if dtype_name:
        kw["dtype"] = dtype_name
    try:
        config = LCKVLlamaConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"the source config does not make a valid LCKV config: {str(e).splitlines()[0]}") from None
    config.architectures = ["LCKVLlamaForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    # serving engines that share KVs only with an earlier layer (vLLM's kv_sharing_target_layer_name) read this
    # {layer: target layer} map; upward (LCKV) layouts have none and need lckv's model code (docs/routing.md)
    if has_upward(kv_sources):
        if hasattr(config, "vllm_kv_sharing"):
            delattr(config, "vllm_kv_sharing")  # a reshared source's map no longer applies
    else:
        config.vllm_kv_sharing = {str(i): s for i, s in vllm_sharing_map(kv_sources).items()}
    return config


def _copy_remote_code(dest: Path) -> None:
    import lckv

    here = Path(lckv.__file__).parent
    for name in REMOTE_CODE:
        shutil.copyfile(here / name, dest / name)


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.is_file() or (output_dir.exists() and not output_dir.is_dir()):
        raise ConvertError(f"output {output_dir} is a file: choose a folder path for -o")
    if output_dir.exists() and not overwrite:
        raise ConvertError(f"output folder {output_dir} already exists: pass --overwrite or choose another -o")
    for parent in output_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConvertError(f"{parent} is a file, so {output_dir} cannot be created: choose another -o")
            break


def _check_not_overwriting_source(source: Source, output_dir: Path) -> None:
    where = source.gguf_path if source.kind == "gguf" else source.folder
    if where is None or not output_dir.exists():
        return
    out, src = output_dir.resolve(), Path(where).resolve()
    if out == src or out in src.parents:
        raise ConvertError(f"output {output_dir} contains the source {where}: choose another -o")


def _check_free_space(parent: Path, needed: int) -> None:
    probe = parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.02 + 64 * 1024**2:
        raise ConvertError(
            f"not enough disk space for the output: it needs about {human_bytes(needed)}, {probe} has "
            f"{human_bytes(free)} free; free some space or choose another -o"
        )


def _first_missing(folder: Path) -> Path | None:
    """The outermost ancestor of ``folder`` (or itself) that does not exist yet."""
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _remove_empty_parents(folder: Path, created: Path | None) -> None:
    """Undo the parent folders a failed conversion created (only if still empty)."""
    if created is None:
        return
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == created:
            return


def _make_temp(output_dir: Path) -> Path:
    """A temporary folder next to the output (same filesystem, so the final rename is atomic)."""
    parent = output_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".lckv-tmp", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should be an ordinary folder
    return tmp


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    if output_dir.exists():  # --overwrite: the old folder goes only once the new one is complete
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".lckv-old", dir=tmp.parent))
        old.rmdir()
        output_dir.rename(old)
        tmp.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output_dir)


def _run_check(source: Source, reader, folder: Path, side_files: list[str], trust_remote_code: bool, tokens: int):
    from transformers import AutoTokenizer

    from .check import load_converted, load_source_model, run_check

    if not any(n.startswith("tokenizer") for n in side_files):
        logger.warning("the source has no tokenizer files: --check skipped")
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    logger.info("check: loading the source model and the converted model")
    source_model = load_source_model(source, reader if source.kind == "gguf" else None)
    converted = load_converted(folder)
    return run_check(source_model, converted, tokenizer, max_tokens=tokens)


def _source_title(source: Source) -> str:
    if source.hub_id:
        return source.hub_id.split("/")[-1]
    if source.kind == "gguf":
        return source.gguf_path.stem
    return Path(source.spec).name or str(source.spec)


def _command(src, spec, output_dir, kv_init, dtype, reshare, push_to_hub, private) -> str:
    args = ["lckv-convert", str(src), "--warmup", spec, "-o", str(output_dir), "--kv-init", kv_init]
    if dtype:
        args += ["--dtype", dtype]
    if reshare:
        args.append("--reshare")
    if push_to_hub:
        args += ["--push-to-hub", push_to_hub] + (["--private"] if private else [])
    return shlex.join(args)
