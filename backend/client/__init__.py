"""A Python client of Cocoon's sealed mode, for API users' own code (``cocoon chat --sealed``).

It fetches the public attestation report with a fresh nonce and verifies it here, against a
policy the caller holds (:mod:`backend.attestation.checks`), seals the request to a worker it
trusts with a reply key of its own, and opens and checks the reply: each event sealed to that
key, the final record signed by the worker, the receipt signed by its attested key and covering
the request it sealed and the text it read. The backend sees ciphertext only.

    from backend.client import SealedClient, load_policy

    async with SealedClient("http://127.0.0.1:8080", api_key, policy=load_policy(path)) as c:
        reply = await c.chat("smollm2-135m", [{"role": "user", "content": "Hi"}], max_tokens=64)
        print(reply.text, reply.worker.image, reply.receipt["signed"]["receipt"])

Installed with the operator's extra (``pip install 'cocoon[operator]'``: dcap-qvl verifies
TDX quotes). The protocol, for clients in other languages: README, "Verify it yourself".
"""

from backend.attestation.checks import WorkerCheck
from backend.attestation.policy import Policy, load_policy
from backend.client.sealed import SealedClient, SealedError, SealedReply

__all__ = ["Policy", "SealedClient", "SealedError", "SealedReply", "WorkerCheck", "load_policy"]
