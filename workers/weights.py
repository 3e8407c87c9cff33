"""The digest of a model's weights: what a worker claims it loaded, and what the policy lists.

One function, :func:`weights_digest`, used by the worker node (over the files its engine
loads) and by the operator's ``cocoon attest digest PATH`` (to write the allow-list), so the
two always agree:

* a file (a GGUF for llama.cpp): the hex SHA-256 of its bytes, what ``sha256sum FILE`` prints;
* a folder (a vLLM model folder): the hex SHA-256 of its manifest, one line
  ``"<sha256 of the file>  <name>\\n"`` per weight file in name order, where the weight files
  are the folder's own ``*.safetensors`` files and the files that decide how they run
  (``*.json``: the model and tokenizer configuration; ``tokenizer.model``; ``*.jinja``: a chat
  template). That is what ``cd FOLDER && sha256sum $(ls | grep -E
  '\\.(safetensors|json|jinja)$|^tokenizer\\.model$' | LC_ALL=C sort) | sha256sum`` prints. A
  folder without a ``*.safetensors`` file is refused.

Hashing 100 GB takes minutes, so the node keeps a cache of file digests keyed by the resolved
path, size, mtime and ctime (:class:`DigestCache`, ``COCOON_DIGEST_CACHE``: a JSON file, or
``off``): a restart with unchanged files hashes nothing. The cache is only as trustworthy as
the disk it is on: a released image keeps it (and the weights) on the TD's own encrypted disk.

Stdlib only: the backend imports this module too.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = [
    "DIGEST_CACHE_ENV",
    "DigestCache",
    "WeightsError",
    "default_cache",
    "is_digest",
    "weight_files",
    "weights_digest",
]

DIGEST_CACHE_ENV = "COCOON_DIGEST_CACHE"
WEIGHT_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.jinja")
MAX_WEIGHT_FILES = 4096
MAX_CACHE_BYTES = 4 * 1024 * 1024
MAX_CACHE_ENTRIES = 10_000
_BLOCK = 1 << 20
_HEX = frozenset("0123456789abcdef")


class WeightsError(RuntimeError):
    """The weights cannot be hashed (missing, not a regular file, changed while hashed)."""


def is_digest(value: object) -> bool:
    """A lowercase hex SHA-256 (64 characters)."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


class DigestCache:
    """File digests by (resolved path, size, mtime, ctime), in one JSON file.

    A damaged, oversized or unreadable cache file counts as empty; a cache that cannot be
    written is skipped (the digest is still right, the next start hashes again).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, object]] | None = None

    def _load(self) -> dict[str, dict[str, object]]:
        if self._entries is None:
            self._entries = {}
            try:
                with self.path.open("rb") as handle:
                    raw = handle.read(MAX_CACHE_BYTES + 1)
                data = json.loads(raw) if len(raw) <= MAX_CACHE_BYTES else None
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict):
                self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
        return self._entries

    def get(self, path: Path, stamp: list[int]) -> str | None:
        entry = self._load().get(str(path))
        if entry is not None and entry.get("stamp") == stamp and is_digest(entry.get("sha256")):
            return str(entry["sha256"])
        return None

    def put(self, path: Path, stamp: list[int], digest: str) -> None:
        entries = self._load()
        entries.pop(str(path), None)
        entries[str(path)] = {"stamp": stamp, "sha256": digest}
        while len(entries) > MAX_CACHE_ENTRIES:  # the oldest first
            entries.pop(next(iter(entries)))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-")
            with os.fdopen(fd, "w") as handle:
                json.dump(entries, handle)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


def default_cache() -> DigestCache | None:
    """The node's cache: ``$COCOON_DIGEST_CACHE`` (``off``: none), else
    ``$XDG_CACHE_HOME/cocoon/weights-sha256.json`` (``~/.cache`` by default)."""
    configured = os.environ.get(DIGEST_CACHE_ENV, "").strip()
    if configured.lower() in {"off", "0", "false", "no"}:
        return None
    if configured:
        return DigestCache(Path(configured))
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return DigestCache(Path(base) / "cocoon" / "weights-sha256.json")


def _stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def file_digest(path: Path, cache: DigestCache | None = None) -> str:
    """Hex SHA-256 of one regular file (through ``cache`` when given)."""
    path = path.resolve()  # a Hugging Face snapshot links to its blobs
    if not path.is_file():
        raise WeightsError(f"{path} is not a regular file")
    stamp = _stamp(path)
    if cache is not None and (known := cache.get(path, stamp)) is not None:
        return known
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    except OSError as error:
        raise WeightsError(f"cannot read {path}: {error.strerror}") from None
    if _stamp(path) != stamp:
        raise WeightsError(f"{path} changed while it was being hashed")
    value = digest.hexdigest()
    if cache is not None:
        cache.put(path, stamp, value)
    return value


def weight_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that the digest covers, in name order (see the module doc)."""
    names = sorted(
        entry.name
        for entry in folder.iterdir()
        if any(fnmatch.fnmatchcase(entry.name, p) for p in WEIGHT_PATTERNS) and entry.is_file()
    )
    if not any(name.endswith(".safetensors") for name in names):
        raise WeightsError(f"{folder} holds no *.safetensors file: not a model folder")
    if len(names) > MAX_WEIGHT_FILES:
        raise WeightsError(f"{folder} holds {len(names)} weight files (at most {MAX_WEIGHT_FILES})")
    return [folder / name for name in names]


def weights_digest(path: str | os.PathLike[str], cache: DigestCache | None = None) -> str:
    """The digest of the weights at ``path``: a file, or a model folder (see the module doc)."""
    target = Path(path)
    if target.is_dir():
        manifest = "".join(f"{file_digest(f, cache)}  {f.name}\n" for f in weight_files(target))
        return hashlib.sha256(manifest.encode("utf-8")).hexdigest()
    if not target.exists():
        raise WeightsError(f"{target} does not exist")
    return file_digest(target, cache)
