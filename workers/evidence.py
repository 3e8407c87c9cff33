"""What a worker proves about itself, and how: claims, report data, and the evidence kinds.

Both sides import this module (the worker collects evidence, the backend verifies it), so it
stays light like :mod:`workers.wire`: stdlib, pydantic and PyNaCl only.

* :class:`Claims`: the worker's public keys, the model id and the digest of the weights its
  engine loaded (:func:`workers.weights.weights_digest`), the engine's kind, version and
  configuration (every option that changes what runs on a prompt or where it goes, as the
  engine's ``attested_config()`` states it), the worker version, and the backend's fresh nonce.
* :func:`off_machine_reason`: whether that engine configuration sends prompts off the machine
  (the ``openai`` engine pointed anywhere but loopback). Both sides decide it with this one
  function: the node refuses to start that way outside the development TEE, and the backend
  refuses such evidence from an attested worker.
* ``report_data`` = SHA-512 of the canonical JSON of the claims (64 bytes: exactly the TDX
  report-data field), so a quote whose report data matches binds those keys to that TD.
* Evidence kinds:

  - ``tdx``: a TDX quote taken through Linux configfs-tsm (:func:`tdx_quote`);
  - ``dev``: a development TEE: report data signed by a local software key
    (:func:`dev_evidence`). It proves nothing about the machine; a backend accepts it only when
    its operator enabled dev mode, and shows it as "dev" everywhere;
  - ``nvidia`` (optional, alongside ``tdx``): GPU evidence from NVIDIA's ``nv-attestation-sdk``,
    bound to the same nonce (:func:`nvidia_evidence`), attached when a CC-mode GPU is present.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import nacl.signing
from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.wire import canonical_json

__all__ = [
    "CLAIMS_VERSION",
    "TSM_REPORT_ROOT",
    "AttestationRefused",
    "BackendUnavailable",
    "Claims",
    "DevProof",
    "Evidence",
    "EvidenceError",
    "Registration",
    "collect_evidence",
    "config_json",
    "config_sha256",
    "dev_evidence",
    "nvidia_evidence",
    "off_machine_reason",
    "register_with_backend",
    "report_data",
    "resolve_tee",
    "tdx_quote",
    "worker_version",
]

CLAIMS_VERSION: Final = 2
MAX_ENGINE_CONFIG_BYTES = 4096
TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
MAX_QUOTE_BYTES = 64 * 1024
MAX_NVIDIA_BYTES = 1024 * 1024

TeeKind = Literal["tdx", "dev"]


class EvidenceError(RuntimeError):
    """Evidence could not be collected on this machine (no TDX, no configfs-tsm, ...)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Claims(_Strict):
    """What the worker states about itself; bound into the evidence by :func:`report_data`."""

    v: Literal[2] = CLAIMS_VERSION
    box_public_key: str = Field(min_length=1, max_length=64, description="X25519, base64")
    verify_key: str = Field(min_length=1, max_length=64, description="Ed25519, base64")
    model: str = Field(min_length=1, max_length=200)
    model_sha256: str = Field(
        default="",
        pattern=r"^([0-9a-f]{64})?$",
        description="digest of the weights the engine loaded (hex); '' when it loads no file",
    )
    engine: str = Field(min_length=1, max_length=64)
    engine_version: str = Field(max_length=64)
    engine_config: dict[str, Any] = Field(
        default_factory=dict, description="the engine's attested configuration (JSON object)"
    )
    worker_version: str = Field(max_length=64)
    nonce: str = Field(min_length=16, max_length=128)

    @field_validator("engine_config")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(config_json(value))
        except (TypeError, ValueError) as error:
            raise ValueError(f"not a JSON object: {error}") from None
        if size > MAX_ENGINE_CONFIG_BYTES:
            raise ValueError(f"{size} bytes of canonical JSON, more than {MAX_ENGINE_CONFIG_BYTES}")
        return value


class DevProof(_Strict):
    """A development TEE's proof: ``signature`` of the report data by ``public_key`` (Ed25519)."""

    public_key: str = Field(max_length=64)
    signature: str = Field(max_length=128)


class Evidence(_Strict):
    """What the worker sends to the backend's ``/v1/workers/register``."""

    tee: TeeKind
    claims: Claims
    quote: str | None = Field(default=None, max_length=MAX_QUOTE_BYTES * 2, description="b64")
    dev: DevProof | None = None
    nvidia: dict[str, Any] | None = Field(default=None, description="GPU evidence, optional")


def report_data(claims: Claims) -> bytes:
    """SHA-512 of the canonical claims: the 64 bytes that go into the TDX report data."""
    return hashlib.sha512(canonical_json(claims)).digest()


def worker_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cocoon")
    except PackageNotFoundError:
        return "unknown"


def config_json(config: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an engine configuration: sorted keys, no spaces, UTF-8."""
    text = json.dumps(
        dict(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def config_sha256(config: Mapping[str, Any]) -> str:
    """Hex SHA-256 of :func:`config_json`: how records and refusals name a configuration."""
    return hashlib.sha256(config_json(config)).hexdigest()


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name: it could resolve anywhere
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def off_machine_reason(engine: str, config: Mapping[str, Any]) -> str | None:
    """Why this engine configuration sends prompts off the worker's machine (None: it does not).

    Only the ``openai`` engine sends prompts anywhere: to its ``base_url``, which must be a
    loopback address (``127.0.0.0/8``, ``::1``, ``localhost``) for the server to be inside the
    same TEE. Any other host, a host name included, is off the machine.
    """
    if engine != "openai":
        return None
    url = config.get("base_url")
    host = None
    # Only a plain http(s)://host[:port][/path]: parsers differ on the rest (userinfo, "\\").
    if isinstance(url, str) and url.isprintable() and not any(c in url for c in "\\@ "):
        try:
            parts = urlsplit(url)
            host = parts.hostname if parts.scheme in ("http", "https") else None
        except ValueError:
            host = None
    if _loopback(host):
        return None
    return (
        f"the openai engine sends every prompt to {str(url)[:200]!r}, which is not a loopback "
        "address: off this machine, outside the TEE"
    )


def resolve_tee(kind: str) -> str:
    """``auto`` → ``tdx`` when configfs-tsm is there, else ``dev``; other kinds as they are."""
    if kind == "auto":
        return "tdx" if TSM_REPORT_ROOT.is_dir() else "dev"
    return kind


# -- collection (worker side) -------------------------------------------------------------------


def tdx_quote(data: bytes, root: Path = TSM_REPORT_ROOT) -> bytes:
    """A TDX quote with ``data`` (64 bytes) as report data, through Linux configfs-tsm."""
    if len(data) != 64:
        raise EvidenceError("TDX report data must be 64 bytes")
    if not root.is_dir():
        raise EvidenceError(f"{root} does not exist: not a TDX guest, or configfs-tsm is missing")
    entry = root / f"cocoon-{uuid.uuid4().hex}"
    try:
        entry.mkdir()
        (entry / "inblob").write_bytes(data)
        quote = (entry / "outblob").read_bytes()
    except OSError as error:
        raise EvidenceError(f"configfs-tsm refused the report request: {error}") from error
    finally:
        try:
            entry.rmdir()
        except OSError:
            pass
    if not quote:
        raise EvidenceError("configfs-tsm returned an empty quote")
    return quote


def dev_evidence(claims: Claims, key: nacl.signing.SigningKey | None = None) -> Evidence:
    """Development TEE evidence: the report data signed by a local software key."""
    key = key or nacl.signing.SigningKey.generate()
    signature = key.sign(report_data(claims)).signature
    proof = DevProof(
        public_key=base64.b64encode(bytes(key.verify_key)).decode(),
        signature=base64.b64encode(signature).decode(),
    )
    return Evidence(tee="dev", claims=claims, dev=proof)


def tdx_evidence(claims: Claims, root: Path = TSM_REPORT_ROOT) -> Evidence:
    quote = tdx_quote(report_data(claims), root)
    return Evidence(
        tee="tdx",
        claims=claims,
        quote=base64.b64encode(quote).decode(),
        nvidia=nvidia_evidence(claims.nonce),
    )


def nvidia_evidence(nonce: str) -> dict[str, Any] | None:
    """GPU evidence bound to ``nonce``, or None when no NVIDIA CC tooling or GPU is present.

    The nonce given to the GPU is SHA-256 of the backend's nonce (the SDK takes 32 bytes, hex).
    """
    try:
        from nv_attestation_sdk import attestation
    except ImportError:
        return None
    gpu_nonce = hashlib.sha256(nonce.encode()).hexdigest()
    try:
        client = attestation.Attestation()
        client.set_name("cocoon-worker")
        client.set_nonce(gpu_nonce)
        client.add_verifier(attestation.Devices.GPU, attestation.Environment.LOCAL, "", "")
        evidence = client.get_evidence()
    except Exception:  # no CC-mode GPU, no driver: the evidence is optional
        return None
    if not evidence:
        return None
    return {"nonce": gpu_nonce, "evidence": evidence}


# -- onboarding client (worker side) ------------------------------------------------------------


class AttestationRefused(RuntimeError):
    """The backend refused the token or the evidence; ``reasons`` say why."""

    def __init__(self, status: int, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons) or f"refused (HTTP {status})")
        self.status = status
        self.reasons = reasons


class BackendUnavailable(OSError):
    """The backend answered 5xx: it could not decide now (its collateral service is down, or it
    failed). Not a refusal: like an unreachable backend, the node tries again."""


class Registration(_Strict):
    """The sealed credentials a backend returns on acceptance (see backend onboarding)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    worker_id: str
    redis_url: str
    expires_at: float
    renewal_token: str
    tee: TeeKind
    redis_ca_pem: str | None = None  # CA bundle of the Redis server's TLS certificate


def collect_evidence(
    kind: str, claims: Claims, dev_key: nacl.signing.SigningKey | None
) -> Evidence:
    """``kind``: ``tdx``, ``dev``, or ``auto`` (TDX when configfs-tsm is there, else dev)."""
    kind = resolve_tee(kind)
    if kind == "tdx":
        return tdx_evidence(claims)
    if kind == "dev":
        return dev_evidence(claims, dev_key)
    raise EvidenceError(f"unknown TEE kind {kind!r}: tdx, dev or auto")


async def register_with_backend(
    register_url: str,
    token: str,
    claims_without_nonce: dict[str, Any],
    box_key: Any,
    *,
    tee: str = "auto",
    dev_key: nacl.signing.SigningKey | None = None,
) -> Registration:
    """Nonce → evidence → register. Raises AttestationRefused, or OSError-like network errors
    (``aiohttp.ClientError``, :class:`BackendUnavailable` for a 5xx) that the caller may retry."""
    import aiohttp
    import nacl.public

    base = register_url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{base}/v1/workers/nonce", json={"token": token}) as reply:
            body = await _json(reply)
            _raise_for(reply.status, body)
        claims = Claims(**claims_without_nonce, nonce=body["nonce"])
        evidence = collect_evidence(tee, claims, dev_key)
        payload = {"token": token, "evidence": evidence.model_dump(mode="json")}
        async with session.post(f"{base}/v1/workers/register", json=payload) as reply:
            body = await _json(reply)
            _raise_for(reply.status, body)
    try:
        sealed = base64.b64decode(body["sealed"], validate=True)
        plain = nacl.public.SealedBox(box_key).decrypt(sealed)
        return Registration.model_validate_json(plain)
    except Exception as error:
        raise AttestationRefused(200, [f"cannot open the sealed credentials: {error}"]) from None


def _raise_for(status: int, body: dict[str, Any]) -> None:
    if status == 200:
        return
    reasons = body.get("reasons") or [str(body)]
    if status >= 500:
        raise BackendUnavailable(
            f"the backend answered HTTP {status}: {'; '.join(map(str, reasons))}"
        )
    raise AttestationRefused(status, reasons)


async def _json(reply: Any) -> dict[str, Any]:
    try:
        data = await reply.json(content_type=None)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"reasons": [f"HTTP {reply.status}"]}
