"""NVIDIA GPU evidence (optional): checked when a worker attaches it.

The worker attaches ``{"nonce": <hex SHA-256 of the backend's nonce>, "evidence": [...]}``
(see :func:`workers.evidence.nvidia_evidence`). The verifier checks the binding to the nonce,
then has NVIDIA's ``nv-attestation-sdk`` verify the evidence against its policy. A verifier
without the SDK cannot check GPU evidence, and says so rather than accept it unchecked.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

DEFAULT_GPU_POLICY = {
    "version": "3.0",
    "authorization-rules": {
        "type": "JWT",
        "overall-claims": {"iss": "LOCAL_GPU_VERIFIER", "x-nvidia-overall-att-result": True},
        "detached-claims": {"measres": "success", "x-nvidia-gpu-driver-rim-schema-validated": True},
    },
}


def verify_nvidia(evidence: Any, nonce: str) -> list[str]:
    """Reasons to refuse ``evidence`` (empty: verified)."""
    if not isinstance(evidence, dict) or set(evidence) != {"nonce", "evidence"}:
        return ["the NVIDIA GPU evidence is malformed: expected an object with nonce and evidence"]
    gpu_nonce = evidence["nonce"]
    if not isinstance(gpu_nonce, str) or not re.fullmatch(r"[0-9a-f]{64}", gpu_nonce):
        return ["the NVIDIA GPU evidence is malformed: its nonce is not 64 hex digits"]
    if gpu_nonce != hashlib.sha256(nonce.encode()).hexdigest():
        return ["the NVIDIA GPU evidence was not taken for this nonce (replayed or mixed up)"]
    if not isinstance(evidence["evidence"], list) or not evidence["evidence"]:
        return ["the NVIDIA GPU evidence is malformed: no GPU evidence entries"]
    try:
        from nv_attestation_sdk import attestation
    except ImportError:
        return [
            "the worker attached NVIDIA GPU evidence, but this verifier cannot check it "
            "(nv-attestation-sdk is not installed)"
        ]
    try:  # pragma: no cover - needs the SDK and NVIDIA's services
        client = attestation.Attestation()
        client.set_name("cocoon-verifier")
        client.set_nonce(gpu_nonce)
        client.add_verifier(attestation.Devices.GPU, attestation.Environment.LOCAL, "", "")
        if not client.attest(evidence["evidence"]):
            return ["the NVIDIA GPU evidence does not verify"]
        if not client.validate_token(json.dumps(DEFAULT_GPU_POLICY)):
            return ["the NVIDIA GPU attestation result does not satisfy the GPU policy"]
    except Exception as error:  # pragma: no cover
        return [f"the NVIDIA GPU evidence could not be verified ({type(error).__name__})"]
    return []
