"""The weights digest a worker claims (issue 12, item 1): ``cocoon attest digest`` prints what
the node computes, the README's ``sha256sum`` command gives the same, only the files that run
count, and a restart takes the digest from its cache until the file changes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.redis_server import REPO
from workers.weights import DigestCache, weights_digest


def sha256sum_manifest(folder: Path, names: list[str]) -> str:
    """What ``sha256sum NAMES | sha256sum`` prints in ``folder`` (the README's command)."""
    lines = "".join(
        f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n" for name in names
    )
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.slow
def test_cocoon_attest_digest_prints_the_digest_the_node_claims(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    folder = tmp_path / "qwen"
    folder.mkdir()
    for name, data in {
        "model-00001-of-00002.safetensors": b"first half",
        "model-00002-of-00002.safetensors": b"second half",
        "config.json": b'{"architectures": ["Qwen3ForCausalLM"]}',
        "tokenizer.json": b"{}",
        "chat_template.jinja": b"{{ messages }}",
        "README.md": b"not part of what runs",
    }.items():
        (folder / name).write_bytes(data)
    (folder / ".cache").mkdir()  # a download's leftovers: not weights
    weights = [
        "chat_template.jinja",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
    ]

    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "attest", "digest", str(gguf), str(folder)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COCOON_DIGEST_CACHE": "off"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{hashlib.sha256(gguf.read_bytes()).hexdigest()}  {gguf}",
        f"{sha256sum_manifest(folder, weights)}  {folder}",
    ]
    # The node's own code says the same.
    assert weights_digest(folder) == sha256sum_manifest(folder, weights)
    # A changed README changes nothing; a changed shard changes the digest.
    (folder / "README.md").write_bytes(b"edited")
    assert weights_digest(folder) == sha256sum_manifest(folder, weights)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"second half, fine-tuned")
    assert weights_digest(folder) != sha256sum_manifest(folder, [])

    # A path that is not weights: said, exit 1.
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "attest", "digest", str(empty)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 1 and "no *.safetensors file" in done.stderr


def test_a_restart_takes_the_digest_from_the_cache_until_the_file_changes(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights v1" * 1000)
    real = hashlib.sha256(gguf.read_bytes()).hexdigest()
    cache_file = tmp_path / "cache" / "digests.json"
    assert weights_digest(gguf, DigestCache(cache_file)) == real
    # The next start reads the cache instead of the file: shown by a cache entry that says
    # something else for the very same path, size and times.
    entries = json.loads(cache_file.read_text())
    entries[str(gguf.resolve())]["sha256"] = "0" * 64
    cache_file.write_text(json.dumps(entries))
    assert weights_digest(gguf, DigestCache(cache_file)) == "0" * 64
    # Other weights of the same size at the same path: hashed again, whatever the cache says.
    gguf.write_bytes(b"weights v2" * 1000)
    assert (
        weights_digest(gguf, DigestCache(cache_file))
        == hashlib.sha256(gguf.read_bytes()).hexdigest()
    )
    # A damaged cache counts as empty.
    cache_file.write_text("{not json")
    assert weights_digest(gguf, DigestCache(cache_file)) != real
