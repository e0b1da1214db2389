"""What a node is, as three digests anyone can recompute: its code, its configuration, its weights.

- code: SHA-256 of the manifest `<sha256 hex>  <path>\\n` of every ccserve/**/*.py, sorted by path (byte order),
  paths relative to the package's parent: exactly `find ccserve -name '*.py' | LC_ALL=C sort | xargs sha256sum
  | sha256sum` run where ccserve/ is installed.
- config: SHA-256 of the canonical JSON of the effective configuration (engine settings, server settings,
  privacy policy, declared public prefixes), without machine-local paths: the weights digest stands for the model.
- weights: the RFC 6962 Merkle root over every file of the model directory (hidden files excluded), one leaf per
  file, sorted by path, leaf data `<sha256 hex>  <path>` (a sha256sum line). A Merkle tree rather than one hash
  of hashes so a single file can later be proven part of a release without publishing the others' digests.

The measurement record (canonical JSON of the three digests, a format tag and the ccserve version) is the log
entry of a release; a node's evidence carries the same record, so a client finds it in the log by its leaf hash.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

import ccserve
from ccserve.attest import merkle
from ccserve.attest.encoding import canonical_json
from ccserve.attest.errors import MalformedEvidence

if TYPE_CHECKING:  # config imports torch; verifiers (the router, clients) need none of it
    from ccserve.config import EngineConfig, ServerOptions

FORMAT = "ccserve-measurement/v1"
_CHUNK = 8 * 2**20
# Where this machine keeps things and how it joins a deployment, not what it runs (one release, many nodes).
_LOCAL_FIELDS = ("model", "tokenizer", "port", "router", "capacity", "advertise_url")


@dataclass(frozen=True)
class Measurement:
    code: str
    config: str
    weights: str
    ccserve_version: str

    def record(self) -> dict:
        return dict(format=FORMAT, **asdict(self))

    def entry(self) -> bytes:
        """The log entry (Merkle leaf data) of this measurement."""
        return canonical_json(self.record())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.entry()).hexdigest()

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.entry())

    @classmethod
    def from_record(cls, record: object) -> Measurement:
        """From a record received in evidence or read from the log; MalformedEvidence when it is not one."""
        fields = {"format", "code", "config", "weights", "ccserve_version"}
        if not isinstance(record, dict) or set(record) != fields or record["format"] != FORMAT:
            raise MalformedEvidence(f"not a {FORMAT} measurement record")
        for name in ("code", "config", "weights"):
            value = record[name]
            if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise MalformedEvidence(f"the measurement's {name} digest is not 64 lowercase hex digits")
        if not isinstance(record["ccserve_version"], str):
            raise MalformedEvidence("the measurement's ccserve_version is not a string")
        return cls(record["code"], record["config"], record["weights"], record["ccserve_version"])


def code_digest(package_dir: str | Path | None = None) -> str:
    """The digest of the installed ccserve code (see the module docstring for the exact recipe)."""
    package = Path(package_dir or Path(ccserve.__file__).parent)
    base = package.parent
    paths = sorted((p.relative_to(base).as_posix() for p in package.rglob("*.py")), key=lambda s: s.encode())
    manifest = "".join(f"{_file_sha256(base / p)}  {p}\n" for p in paths)
    return hashlib.sha256(manifest.encode()).hexdigest()


def measurement_config(engine: EngineConfig, server: ServerOptions | None = None) -> dict:
    """The effective configuration a release and a node measure: every setting that changes what the node does
    with a request, and none of the machine-local ones (model path, port), so one release covers many nodes.
    The public prefixes (texts or token ids, as declared) stand on their own, so a client reading the release's
    configuration sees which prefixes the node caches."""
    settings = {**asdict(engine), **(asdict(server) if server else {})}
    public_prefixes = settings.pop("public_prefixes")
    for name in _LOCAL_FIELDS:
        settings.pop(name, None)
    # LoRA adapters are weights too: each name stands with its directory's Merkle root, not its local path.
    settings["lora_adapters"] = {name: weights_digest(path, progress=False)
                                 for name, path in settings.get("lora_adapters", {}).items()}
    return dict(settings=settings, public_prefixes=public_prefixes)


def config_document(config: dict) -> bytes:
    return canonical_json(config)


def weights_digest(model_dir: str | Path, progress: bool = True) -> str:
    """The Merkle root over the model directory's files; reads every byte once, behind a progress bar."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"model directory {str(root)!r} does not exist: pass the directory the node loads")
    files = _model_files(root)
    if not files:
        raise ValueError(f"model directory {str(root)!r} holds no files to measure")
    total = sum((root / f).stat().st_size for f in files)
    leaves = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="measuring weights",
              disable=None if progress else True) as bar:
        for rel in files:
            leaves.append(merkle.leaf_hash(f"{_file_sha256(root / rel, bar)}  {rel}".encode()))
    return merkle.root(leaves).hex()


def measure(config: dict, model_dir: str | Path, progress: bool = True) -> Measurement:
    """The measurement of this installation running `config` on the weights in `model_dir`."""
    return Measurement(code=code_digest(), config=hashlib.sha256(config_document(config)).hexdigest(),
                       weights=weights_digest(model_dir, progress), ccserve_version=ccserve.__version__)


def _model_files(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found, key=lambda s: s.encode())


def _file_sha256(path: Path, bar: tqdm | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()
