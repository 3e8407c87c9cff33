"""The allow-lists (released worker images, their engine configurations, each model's weights)
and the TCB status policy, from one JSON file.

.. code-block:: json

    {
      "tcb_statuses": ["UpToDate"],
      "max_capacity": 64,
      "models": {
        "qwen3-8b": {"weights_sha256": ["<64 hex>"]}
      },
      "images": [
        {"name": "cocoon-worker", "version": "0.1.0", "max_capacity": 256,
         "mr_td": "<96 hex>", "rtmr0": "<96 hex>", "rtmr1": "...", "rtmr2": "...", "rtmr3": "...",
         "engines": [
           {"engine": "vllm", "version": "0.11.0",
            "config": {"enable_prefix_caching": true, "disable_log_stats": true}}
         ]}
      ]
    }

``tcb_statuses`` defaults to ``["UpToDate"]``: any other status (``SWHardeningNeeded``,
``ConfigurationNeeded``, ``OutOfDate``, ...) is refused unless listed. An image matches a quote
when MRTD and all four RTMRs are equal.

``models`` maps a model id to the digests of the weights accepted for it
(:func:`workers.weights.weights_digest`; ``cocoon attest digest PATH`` prints one). A worker
outside the development TEE is refused unless its model is listed and the digest of the weights
its engine loaded is one of them; a development worker is checked only when its model is listed.

``engines`` lists, per image, the engine configurations a worker of that image may run: the
engine kind, optionally its version, and its attested configuration (``config``: the JSON
object of the engine's ``attested_config()``, compared exactly; a worker logs its own at start,
and a refusal names the keys that differ). An image with no ``engines`` runs none.

``max_capacity`` caps how many jobs at once the backend dispatches to a worker of that image
(a released image runs one GPU model: the cap is that GPU's); the top-level value is the
default for images that name none, and without either the backend's setting
``COCOON_ATTESTATION__DEFAULT_CAPACITY`` applies. A worker's own claimed capacity only lowers it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from workers.evidence import config_sha256

MEASUREMENTS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
_HEX48 = r"^[0-9a-f]{96}$"
_SHA256 = r"^[0-9a-f]{64}$"


class PolicyError(ValueError):
    """The policy file is missing or malformed."""


class EngineEntry(BaseModel):
    """One engine configuration an image may run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = Field(min_length=1, max_length=64)
    version: str | None = Field(default=None, min_length=1, max_length=64)
    config: dict[str, Any] = Field(default_factory=dict)

    def matches(self, engine: str, version: str, config: dict[str, Any]) -> bool:
        return (
            self.engine == engine
            and self.version in (None, version)
            and config_sha256(self.config) == config_sha256(config)
        )


class ModelWeights(BaseModel):
    """The weights accepted for one model id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights_sha256: tuple[Annotated[str, StringConstraints(pattern=_SHA256)], ...] = Field(
        min_length=1
    )


class Image(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    mr_td: str = Field(pattern=_HEX48)
    rtmr0: str = Field(pattern=_HEX48)
    rtmr1: str = Field(pattern=_HEX48)
    rtmr2: str = Field(pattern=_HEX48)
    rtmr3: str = Field(pattern=_HEX48)
    max_capacity: int | None = Field(default=None, ge=1, le=1_000_000)
    engines: tuple[EngineEntry, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    images: tuple[Image, ...] = ()
    models: dict[Annotated[str, StringConstraints(min_length=1, max_length=200)], ModelWeights] = (
        Field(default_factory=dict)
    )
    max_capacity: int | None = Field(default=None, ge=1, le=1_000_000)

    def capacity(self, image_label: str | None) -> int | None:
        """The cap on jobs at once for a worker of this image (None: the policy sets none)."""
        for image in self.images:
            if image.label == image_label and image.max_capacity is not None:
                return image.max_capacity
        return self.max_capacity

    def weights_problems(self, model: str, digest: str, tee: str) -> list[str]:
        """Why the weights ``digest`` claimed for ``model`` are refused (empty: accepted)."""
        allowed = self.models.get(model)
        if allowed is None:
            if tee == "dev":
                return []  # a development worker: checked only against a listed model
            return [
                f"the policy allow-lists no weights for model {model!r}: an attested worker must "
                "run weights whose digest the operator listed (cocoon attest digest PATH)"
            ]
        if not digest:
            return [
                f"the worker claims no weights digest for model {model!r}: its engine loads no "
                "weights file the node could hash (the openai engine needs weights_path)"
            ]
        if digest not in allowed.weights_sha256:
            return [f"weights sha256 {digest} are not on the allow-list of model {model!r}"]
        return []

    def engine_problems(
        self, image_label: str, engine: str, version: str, config: dict[str, Any]
    ) -> list[str]:
        """Why image ``image_label`` may not run this engine configuration (empty: it may)."""
        image = next((i for i in self.images if i.label == image_label), None)
        if image is None:
            return []  # no such image: the measurements were refused already
        if any(entry.matches(engine, version, config) for entry in image.engines):
            return []
        which = f"engine {engine} {version}"
        same = [e for e in image.engines if e.engine == engine and e.version in (None, version)]
        if not same:
            return [f"image {image.label} allow-lists no configuration of {which}"]
        closest = min(same, key=lambda e: len(_differing(e.config, config)))
        keys = ", ".join(_differing(closest.config, config)[:10])
        return [
            f"{which} with configuration sha256 {config_sha256(config)} is not allow-listed for "
            f"image {image.label}; the nearest allowed one differs in: {keys}"
        ]

    def match(self, measurements: dict[str, str]) -> tuple[Image | None, list[str]]:
        """The released image with exactly these measurements, else None and the reasons."""
        if not self.images:
            return None, ["no released worker image is in the allow-list (policy file)"]
        for image in self.images:
            if all(getattr(image, name) == measurements.get(name) for name in MEASUREMENTS):
                return image, []
        # Say which measurement matches no image at all: the one the provider must look at.
        reasons = [
            f"{name} {measurements.get(name, '')[:16]}... matches no released image"
            for name in MEASUREMENTS
            if all(getattr(image, name) != measurements.get(name) for image in self.images)
        ]
        return None, reasons or [
            "MRTD and RTMR0-3 each match a released image, but not all the same one"
        ]


def _differing(allowed: dict[str, Any], claimed: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two configurations, sorted."""
    return sorted(
        k
        for k in allowed.keys() | claimed.keys()
        if k not in allowed
        or k not in claimed
        or config_sha256({"v": allowed[k]}) != config_sha256({"v": claimed[k]})
    )


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path``; without a file, the default policy (no image is allowed)."""
    if path is None:
        return Policy()
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise PolicyError(f"cannot read the policy file {path}: {error.strerror}") from None
    except ValueError as error:
        raise PolicyError(f"the policy file {path} is not JSON: {error}") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PolicyError(f"the policy file {path} is invalid: {where}: {first['msg']}") from None
