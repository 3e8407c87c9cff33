"""The allow-list of released worker images and the TCB status policy, from one JSON file.

.. code-block:: json

    {
      "tcb_statuses": ["UpToDate"],
      "max_capacity": 64,
      "images": [
        {"name": "cocoon-worker", "version": "0.1.0", "max_capacity": 256,
         "mr_td": "<96 hex>", "rtmr0": "<96 hex>", "rtmr1": "...", "rtmr2": "...", "rtmr3": "..."}
      ]
    }

``tcb_statuses`` defaults to ``["UpToDate"]``: any other status (``SWHardeningNeeded``,
``ConfigurationNeeded``, ``OutOfDate``, ...) is refused unless listed. An image matches a quote
when MRTD and all four RTMRs are equal.

``max_capacity`` caps how many jobs at once the backend dispatches to a worker of that image
(a released image runs one GPU model: the cap is that GPU's); the top-level value is the
default for images that name none, and without either the backend's setting
``COCOON_ATTESTATION__DEFAULT_CAPACITY`` applies. A worker's own claimed capacity only lowers it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MEASUREMENTS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
_HEX48 = r"^[0-9a-f]{96}$"


class PolicyError(ValueError):
    """The policy file is missing or malformed."""


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

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tcb_statuses: tuple[str, ...] = ("UpToDate",)
    images: tuple[Image, ...] = ()
    max_capacity: int | None = Field(default=None, ge=1, le=1_000_000)

    def capacity(self, image_label: str | None) -> int | None:
        """The cap on jobs at once for a worker of this image (None: the policy sets none)."""
        for image in self.images:
            if image.label == image_label and image.max_capacity is not None:
                return image.max_capacity
        return self.max_capacity

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
