"""The recorded TDX hosts the attestation tests verify: real quotes from other machines (two v4
hosts of one platform, TDX 1.5 v5 quotes) and their real Intel collateral
(``fixtures/tdx/README.md``), each checked at a time inside its collateral's window; an
allow-list of their images; and Intel's collateral service, the one thing faked:
:class:`RecordedPccs` is a real aiohttp server on loopback that answers the PCS/PCCS v4 routes
``dcap_qvl.get_collateral`` asks for, with the recorded collateral (the ``pccs`` fixture,
registered in tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote as urlquote

import pytest
from aiohttp import web

from backend.attestation.policy import Policy
from tests.support.attest import ENGINE_CONFIG, FIXTURES, MODELS


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


HOST_A = fixture("quote_v4_90c06f_host_a")
HOST_B = fixture("quote_v4_90c06f_host_b")
TD15 = fixture("quote_v5_td15_90c06f")
TD15EX = fixture("quote_v5_td15ex_b0c06f")
COLLATERAL_90C06F = (FIXTURES / "collateral_90c06f_2026-02.json").read_text()
COLLATERAL_B0C06F = (FIXTURES / "quote_v5_td15ex_b0c06f_collateral.json").read_text()
AT_90C06F = 1772707803  # inside the 90C06F collateral's window (README)
AT_B0C06F = 1792714008  # inside the B0C06F collateral's window (README)
ISSUED_90C06F = 1771412331  # its TCB info's issueDate, 2026-02-18T10:58:51Z

ZERO = "0" * 96
IMAGES = {
    "host-a": {
        "mr_td": "7357a10d2e2724dffe68813e3cc4cfcde6814d749f2fb62e3953e54f6e0b50a2"
        "19786afe2cd478f684b52c61837e1114",
        "rtmr0": "251a7f3cfc68006349444307c686485986beea461740437dae618e22a7aaac4e"
        "c0233ae0190eb1ce92ab8e9966563acc",
        "rtmr1": "7a6eb32a914226f429922564bb0ae0a7c7c413ba5a8ef055b481f6328108da33"
        "5013b79c391dcc237f7e563674ce7787",
        "rtmr2": "aaccda38cf2bdee9965664d6793c9eaa93349564a052f36db45da5db656abe7b"
        "909d92cad5a29287f2bb78761771fec4",
        "rtmr3": ZERO,
    },
    "host-b": {
        "mr_td": "b24d3b24e9e3c16012376b52362ca09856c4adecb709d5fac33addf1c47e193d"
        "a075b125b6c364115771390a5461e217",
        "rtmr0": "2e3843265f8ecdd4e2282694747f6f2f111605c33f2a8882f5734ee6f3a6ce63"
        "d8f34aeef06093dcda76fa5f9d33d8d6",
        "rtmr1": "a1b79d76021970f57c45c4a7c395f780bab37011a4df27fe44e8559bd1abb4d6"
        "e52f12f866d1d08405448eb797a5970f",
        "rtmr2": "1e31b59d605df7ee8160cf7966be9bafa6d0e1905de7e09695a24cd9748e71a6"
        "03a51fae1297619fa0c30517addbcd07",
        "rtmr3": "0f787c3877f3e95095d5a4d13dd0fe0233803b30120d8469866719dc28f519ce"
        "021fe1e53459121e7a5a4443147185a8",
    },
    "td15": {
        "mr_td": "7348651a34b2d2d3462822e3a750ec6110125f36757c78480bbfc69cc0d21fb0"
        "01a1ced3ee19747dda8f750c3bc8f876",
        "rtmr0": "5c8daf76063a71ac8fcef4067564661fc682ed7944c7a5d21dbbced02f61ceff"
        "4ba0678c6aef3bdae8cbc614cec24619",
        "rtmr1": "463acaace1b6e97c76e92e41fe312aa66f3fd4dad60ec7acf169859db0343e3d"
        "1e591646795cdc80fbc0ca5f7041d253",
        "rtmr2": "6369b9c9a3b791ebcbdc5a0bb9536cfb57f50df2b393b33c8b29616d3568baa6"
        "1f4b59dc6092e31ea8764bcbdfc69f20",
        "rtmr3": ZERO,
    },
    "td15ex": {
        "mr_td": "2a674327c50218dba880066b349b8d559d749ed68dce33fd651c184a877d084b"
        "07a9e583767a7ad5da13ed91deec2b70",
        "rtmr0": "0345d2a146eec673fb3861a4d88c5093ef0934b142884294377628cf09fb21bf"
        "a979acec61e79f925f5fccaad0827165",
        "rtmr1": "3484cd07ba093cede0938303617d6da58f3c6a895ddd5461b3bdd0b29f40e869"
        "d4c92642867b44bd3619451bd78ff2d0",
        "rtmr2": "83b7a9a35ed613c17a8b9d36a49f28b095f54daa78b328c93eef10ae3e21094c"
        "1411467e3371157c4cde5e0beb72dcb8",
        "rtmr3": "556d4986cae57e7e3756b6471e4951be6f5f1b4e70942c72325223d6af239da9"
        "0f1484eeb627727e6d2c0755393b5fdf",
    },
}


def image(name: str) -> dict[str, object]:
    engines = [{"engine": "instant", "config": ENGINE_CONFIG}]  # what claims_for claims
    return {"name": name, "version": "1", **IMAGES[name], "engines": engines}


def allow(*names: str) -> Policy:
    return Policy.model_validate(
        {"images": [image(name) for name in names or IMAGES], "models": MODELS}
    )


class RecordedPccs:
    """Intel's PCS/PCCS v4 API for the platforms of recorded collateral (dcap-qvl JSON): TCB info
    per FMSPC (404 for any other, as Intel answers), and the PCK CRL, QE identity and root CA CRL
    from the same recording. Issuer chains travel URL-encoded in headers, as Intel sends them."""

    def __init__(self, *recorded: str) -> None:
        self.platforms = {
            json.loads(data["tcb_info"])["fmspc"].upper(): data
            for data in (json.loads(text) for text in recorded)
        }
        self.common = next(iter(self.platforms.values()))
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_get("/sgx/certification/v4/pckcrl", self.pck_crl)
        app.router.add_get("/tdx/certification/v4/tcb", self.tcb_info)
        app.router.add_get("/tdx/certification/v4/qe/identity", self.qe_identity)
        app.router.add_get("/sgx/certification/v4/rootcacrl", self.root_ca_crl)
        app.middlewares.append(self.record)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        return await handler(request)

    @staticmethod
    def _chain(value: str) -> str:
        return urlquote(value, safe="")

    async def pck_crl(self, request: web.Request) -> web.Response:
        if request.query.get("ca") not in ("platform", "processor"):
            return web.Response(status=400)
        data = self.common
        headers = {"SGX-PCK-CRL-Issuer-Chain": self._chain(data["pck_crl_issuer_chain"])}
        return web.Response(body=bytes.fromhex(data["pck_crl"]), headers=headers)

    async def tcb_info(self, request: web.Request) -> web.Response:
        data = self.platforms.get(request.query.get("fmspc", "").upper())
        if data is None:
            return web.Response(status=404)
        body = f'{{"tcbInfo":{data["tcb_info"]},"signature":"{data["tcb_info_signature"]}"}}'
        headers = {"TCB-Info-Issuer-Chain": self._chain(data["tcb_info_issuer_chain"])}
        return web.Response(text=body, content_type="application/json", headers=headers)

    async def qe_identity(self, request: web.Request) -> web.Response:
        data = self.common
        body = (
            f'{{"enclaveIdentity":{data["qe_identity"]},'
            f'"signature":"{data["qe_identity_signature"]}"}}'
        )
        headers = {
            "SGX-Enclave-Identity-Issuer-Chain": self._chain(data["qe_identity_issuer_chain"])
        }
        return web.Response(text=body, content_type="application/json", headers=headers)

    async def root_ca_crl(self, request: web.Request) -> web.Response:
        return web.Response(text=self.common["root_ca_crl"])  # a PCCS answers it hex-encoded


@pytest.fixture
async def pccs() -> AsyncIterator[RecordedPccs]:
    server = RecordedPccs(COLLATERAL_90C06F)
    await server.start()
    yield server
    await server.stop()
