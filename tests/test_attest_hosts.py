"""Attestation on the hosts providers really have: quote v5 (TDX 1.5) reports, many machines of
one platform verified through one collateral cache, and refusals that name their cause.

Real quotes from other machines and their real Intel collateral (``fixtures/tdx/README.md``), each
verified at a time inside its collateral's window. Intel's collateral service is the one thing
faked: :class:`RecordedPccs` is a real aiohttp server on loopback that answers the PCS/PCCS v4
routes ``dcap_qvl.get_collateral`` asks for, with the recorded collateral.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote as urlquote

import dcap_qvl
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from backend.attestation import store
from backend.attestation.collateral import CollateralSource, load_collateral, platform_collateral
from backend.attestation.onboarding import ONBOARDING
from backend.attestation.policy import Policy
from backend.attestation.tdx import verify_quote
from backend.settings import Settings
from tests.support.attest import (
    ENGINE_CONFIG,
    MODELS,
    base_url,
    claims_for,
    open_credentials,
    serve_backend,
    with_attestation,
)
from workers import evidence as ev
from workers import registry
from workers.wire import WorkerKeys

FIXTURES = Path(__file__).parent / "fixtures" / "tdx"
REPO = Path(__file__).resolve().parent.parent


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


# -- a PCCS on loopback serving the recorded collateral ------------------------------------------


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


def leaf_pem(raw_quote: bytes) -> str:
    chain = dcap_qvl.parse_quote(raw_quote).cert_chain_pem_bytes().decode()
    return chain.split("-----END CERTIFICATE-----")[0].split("-----BEGIN CERTIFICATE-----")[1]


# -- quote v5 (TDX 1.5) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "collateral", "at", "name", "report_type", "svn2"),
    [
        (TD15, COLLATERAL_90C06F, AT_90C06F, "td15", "TD15", "0d010400000000000000000000000000"),
        (TD15EX, COLLATERAL_B0C06F, AT_B0C06F, "td15ex", "TD15Ex", "0f0104" + "0" * 26),
    ],
)
def test_v5_quotes_are_accepted_under_their_allow_listed_image(
    raw: bytes, collateral: str, at: int, name: str, report_type: str, svn2: str
) -> None:
    verdict = verify_quote(raw, platform_collateral(load_collateral(collateral)), at, allow(name))
    assert verdict.accepted, verdict.reasons
    assert verdict.status == "UpToDate" and verdict.image == f"{name} 1"
    assert verdict.quote_version == 5 and verdict.report_type == report_type
    assert verdict.measurements == IMAGES[name]
    assert verdict.mr_service_td == ZERO and verdict.tee_tcb_svn2 == svn2
    # Only its own image: another platform's allow-listed image does not admit it.
    other = verify_quote(raw, load_collateral(collateral), at, allow("host-a"))
    assert not other.accepted and other.status == "UpToDate"
    assert other.reasons[0].startswith("mr_td ")


def test_a_td10_quote_shows_no_td15_fields() -> None:
    verdict = verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), AT_90C06F, allow())
    assert verdict.accepted and verdict.image == "host-a 1"
    assert (verdict.report_type, verdict.quote_version) == ("TD10", 4)
    assert verdict.mr_service_td is None and verdict.tee_tcb_svn2 is None


def run_cli(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "attest", "verify", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, done.stderr


@pytest.mark.slow
def test_cli_shows_a_v5_quotes_td15_fields(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"images": [image("td15ex")], "models": MODELS}))
    code, out, err = run_cli(
        "--quote", str(FIXTURES / "quote_v5_td15ex_b0c06f"),
        "--collateral", str(FIXTURES / "quote_v5_td15ex_b0c06f_collateral.json"),
        "--at", str(AT_B0C06F), "--policy", str(policy_file),
    )  # fmt: skip
    assert code == 0, (out, err)
    assert out is not None and out["accepted"] is True and out["image"] == "td15ex 1"
    assert out["report_type"] == "TD15Ex" and out["quote_version"] == 5
    assert out["fmspc"] == "B0C06F000000"
    assert out["mr_td"] == IMAGES["td15ex"]["mr_td"] and out["mr_service_td"] == ZERO
    assert out["tee_tcb_svn2"] == "0f010400000000000000000000000000"
    # The TD15 quote under an allow-list without its image: refused (1), with the reason.
    code, out, err = run_cli(
        "--quote", str(FIXTURES / "quote_v5_td15_90c06f"),
        "--collateral", str(FIXTURES / "collateral_90c06f_2026-02.json"),
        "--at", str(AT_90C06F), "--policy", str(policy_file),
    )  # fmt: skip
    assert code == 1 and out is not None and out["report_type"] == "TD15"
    assert out["reasons"][0].startswith("mr_td 7348651a34b2d2d3... matches no released image")


@pytest.mark.slow
def test_cli_a_bad_time_is_a_usage_error_not_a_refusal() -> None:
    code, out, err = run_cli(
        "--quote", str(FIXTURES / "quote_v5_td15_90c06f"),
        "--collateral", str(FIXTURES / "collateral_90c06f_2026-02.json"), "--at", "-1",
    )  # fmt: skip
    assert code == 2 and out is None and "--at" in err


def test_cli_a_crash_is_an_error_with_its_own_exit_code(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fault of the verifier (here dcap-qvl failing as no verdict does) is not a refusal."""
    from backend.cli import build_parser

    def crash(*_args: Any) -> Any:
        raise RuntimeError("library fault")

    monkeypatch.setattr(dcap_qvl, "verify", crash)
    args = build_parser().parse_args(
        [
            "attest", "verify", "--quote", str(FIXTURES / "quote_v5_td15_90c06f"),
            "--collateral", str(FIXTURES / "collateral_90c06f_2026-02.json"),
            "--at", str(AT_90C06F),
        ]
    )  # fmt: skip
    code = args.handler(settings, args)
    captured = capsys.readouterr()
    assert code == 70 and captured.out == ""
    assert "could not be checked (RuntimeError: library fault)" in captured.err
    assert "not a verdict" in captured.err


# -- many hosts of one platform, one collateral cache -------------------------------------------


async def test_hosts_of_one_platform_each_verify_against_their_own_chain(
    pccs: RecordedPccs, tmp_path: Path
) -> None:
    source = CollateralSource(pccs.url, tmp_path, clock=lambda: AT_90C06F)
    policy = allow()
    for name, raw in [("host-a", HOST_A), ("host-b", HOST_B), ("host-a", HOST_A), ("td15", TD15)]:
        verdict = verify_quote(raw, await source.get(raw), AT_90C06F, policy)
        assert verdict.accepted, (name, verdict.reasons)
        assert verdict.image == f"{name} 1"
    # Fetched once, through the routes of Intel's API, then served from the cache.
    assert sorted(pccs.requests) == [
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
        "/sgx/certification/v4/rootcacrl",
        "/tdx/certification/v4/qe/identity?update=standard",
        "/tdx/certification/v4/tcb?fmspc=90C06F000000&update=standard",
    ]
    # The cache on disk holds the platform's collateral, no machine's certificate.
    cached = (tmp_path / "platform-90c06f000000.json").read_text()
    assert "tcb_info" in cached
    assert leaf_pem(HOST_A)[:200] not in cached.replace("\\n", "\n")
    # A restarted verifier while the PCCS is down: B first, from the disk cache.
    await pccs.stop()
    restarted = CollateralSource(pccs.url, tmp_path, clock=lambda: AT_90C06F)
    for raw in (HOST_B, HOST_A):
        assert verify_quote(raw, await restarted.get(raw), AT_90C06F, policy).accepted


async def test_a_cache_file_written_with_a_machines_chain_serves_the_other_hosts(
    pccs: RecordedPccs, tmp_path: Path
) -> None:
    """A cache written before chains were dropped (or by anything else) cannot pin host A's
    chain on host B."""
    with_chain = await dcap_qvl.get_collateral(pccs.url, HOST_A)  # as dcap-qvl returns it
    assert leaf_pem(HOST_A)[:200] in with_chain.to_json().replace("\\n", "\n")
    path = tmp_path / "platform-90c06f000000.json"
    path.write_text(json.dumps({"fetched_at": AT_90C06F, "collateral": with_chain.to_json()}))
    await pccs.stop()
    source = CollateralSource(pccs.url, tmp_path, clock=lambda: AT_90C06F)
    verdict = verify_quote(HOST_B, await source.get(HOST_B), AT_90C06F, allow())
    assert verdict.accepted, verdict.reasons


async def test_what_dcap_qvl_fetched_for_host_a_is_a_chain_mismatch_for_host_b(
    pccs: RecordedPccs,
) -> None:
    """The fault this cache avoids, named for what it is; and real tampering, named so."""
    fetched_for_a = await dcap_qvl.get_collateral(pccs.url, HOST_A)
    mismatch = verify_quote(HOST_B, fetched_for_a, AT_90C06F, allow())
    assert not mismatch.accepted and mismatch.collateral_fault
    assert mismatch.reasons[0].startswith(
        "certificate chain mismatch: the collateral carries the PCK certificate chain of "
        "another machine"
    )
    assert "tampered" not in mismatch.reasons[0]
    tampered = bytearray(HOST_B)
    tampered[700] ^= 0x01  # in the signed binary part
    verdict = verify_quote(bytes(tampered), platform_collateral(fetched_for_a), AT_90C06F, allow())
    assert not verdict.accepted and not verdict.collateral_fault
    assert "the quote is corrupted or tampered with" in verdict.reasons[0]


# -- refusals, each naming its cause -------------------------------------------------------------


def test_collateral_not_yet_valid_is_named() -> None:
    verdict = verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), ISSUED_90C06F - 1, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert verdict.reasons[0].startswith(
        "the collateral is not valid yet at 1771412330 (2026-02-18T10:58:50Z)"
    )
    assert verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), ISSUED_90C06F, allow()).accepted


def test_a_certificate_not_valid_yet_is_named() -> None:
    """Host A's PCK certificate (issued 2025-07-20) checked at a 2025-07-04 time."""
    old = load_collateral((FIXTURES / "tdx_quote_collateral.json").read_text())
    verdict = verify_quote(HOST_A, old, 1751624163, allow())
    assert not verdict.accepted and not verdict.collateral_fault
    assert verdict.reasons[0].startswith(
        "a certificate of the quote's PCK chain is not valid yet at 1751624163 "
        "(2025-07-04T10:16:03Z) (valid from 2025-07-20"
    )


def test_collateral_of_another_platform_is_named() -> None:
    other = platform_collateral(load_collateral(COLLATERAL_B0C06F))
    verdict = verify_quote(HOST_A, other, AT_B0C06F, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert verdict.reasons[0].startswith(
        "the collateral is for another platform (TCB info of FMSPC B0C06F000000; the quote's "
        "platform is FMSPC 90C06F000000)"
    )


def test_expired_collateral_is_named() -> None:
    verdict = verify_quote(HOST_B, load_collateral(COLLATERAL_90C06F), AT_B0C06F, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert "outside its validity window" in verdict.reasons[0]


def test_a_fault_of_the_verifier_is_raised_not_a_refusal() -> None:
    with pytest.raises(OverflowError):
        verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), -1, allow())


# -- onboarding: v5 quotes, and the backend's own faults ----------------------------------------


@pytest.fixture
async def backend(
    settings: Settings, pccs: RecordedPccs, tmp_path: Path, admin: aioredis.Redis
) -> AsyncIterator[tuple[str, web.Application]]:
    """``cocoon web`` with the local PCCS and an allow-list of the recorded images, its verifier
    at the 90C06F collateral's time."""
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(
        json.dumps({"images": [image(name) for name in IMAGES], "models": MODELS})
    )
    s = with_attestation(
        settings,
        allow_dev=True,
        pccs_url=pccs.url,
        policy_file=policy_file,
        collateral_dir=tmp_path / "collateral",
    )
    server = await serve_backend(s)
    server.app[ONBOARDING].verifier.clock = lambda: AT_90C06F
    yield base_url(server), server.app
    await server.close()


async def register(
    http: ClientSession, url: str, token: str, evidence: ev.Evidence
) -> tuple[int, dict[str, Any]]:
    payload = {"token": token, "evidence": evidence.model_dump(mode="json")}
    async with http.post(f"{url}/v1/workers/register", json=payload) as reply:
        return reply.status, await reply.json()


async def fresh_nonce(http: ClientSession, url: str, token: str) -> str:
    async with http.post(f"{url}/v1/workers/nonce", json={"token": token}) as reply:
        return (await reply.json())["nonce"]


def tdx_evidence(keys: WorkerKeys, nonce: str, raw: bytes) -> ev.Evidence:
    quote = base64.b64encode(raw).decode()
    return ev.Evidence(tee="tdx", claims=claims_for(keys, nonce), quote=quote)


REPORT_DATA_REFUSAL = (
    "the quote's report data does not equal SHA-512 of the claims: the quote was not taken for "
    "these keys and this nonce"
)


async def test_a_v5_quote_gets_a_refusal_with_reasons_not_a_server_error(
    backend: tuple[str, web.Application], admin: aioredis.Redis
) -> None:
    url, _app = backend
    token = await store.issue_registration_token(admin, None, 600)
    async with ClientSession() as http:
        for raw in (TD15, HOST_B, HOST_A):
            nonce = await fresh_nonce(http, url, token)
            status, body = await register(
                http, url, token, tdx_evidence(WorkerKeys.generate(), nonce, raw)
            )
            # Verified, allow-listed, UpToDate: only the report data (not our claims) is wrong.
            assert (status, body["reasons"]) == (403, [REPORT_DATA_REFUSAL]), body


async def test_the_backends_own_faults_are_not_refusals_and_spend_no_nonce(
    backend: tuple[str, web.Application],
    pccs: RecordedPccs,
    admin: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _app = backend
    token = await store.issue_registration_token(admin, None, 600)
    keys = WorkerKeys.generate()
    port = int(pccs.url.rsplit(":", 1)[1])
    async with ClientSession() as http:
        nonce = await fresh_nonce(http, url, token)
        evidence = tdx_evidence(keys, nonce, TD15)
        # Intel's collateral service is down and nothing is cached: 503, nothing decided.
        await pccs.stop()
        status, body = await register(http, url, token, evidence)
        assert status == 503 and "accepted" not in body, body
        assert "cannot verify evidence right now" in body["error"]
        assert "cannot fetch collateral from" in body["reasons"][0]
        # A crash in the verifier: 500, said as such, nothing decided.
        await pccs.start(port)

        def crash(*_args: Any) -> Any:
            raise RuntimeError("library fault")

        with monkeypatch.context() as patched:
            patched.setattr(dcap_qvl, "verify", crash)
            status, body = await register(http, url, token, evidence)
        assert status == 500 and "accepted" not in body, body
        assert body["error"].startswith("internal error on the backend (RuntimeError)")
        # The same evidence, same nonce, once the backend is well: decided (and only then used).
        status, body = await register(http, url, token, evidence)
        assert (status, body["reasons"]) == (403, [REPORT_DATA_REFUSAL]), body
        status, body = await register(http, url, token, evidence)
        assert status == 403 and "already used" in body["reasons"][0]


async def test_a_renewal_that_meets_a_backend_fault_revokes_nothing(
    backend: tuple[str, web.Application], pccs: RecordedPccs, admin: aioredis.Redis
) -> None:
    url, _app = backend
    keys = WorkerKeys.generate()
    async with ClientSession() as http:
        token = await store.issue_registration_token(admin, None, 600)
        nonce = await fresh_nonce(http, url, token)
        status, body = await register(http, url, token, ev.dev_evidence(claims_for(keys, nonce)))
        assert status == 200, body
        worker_id = body["worker_id"]
        renewal = open_credentials(body, keys)["renewal_token"]
        await pccs.stop()
        nonce = await fresh_nonce(http, url, renewal)
        status, body = await register(http, url, renewal, tdx_evidence(keys, nonce, HOST_A))
        assert status == 503, body
        # Still attested, with its renewal token good: a PCS outage revokes no worker.
        assert await registry.read_attestation(admin, worker_id) is not None
        assert await store.lookup_token(admin, renewal) is not None


async def test_a_worker_reads_a_backend_fault_as_try_again_not_as_refused() -> None:
    """The node side: a 5xx is :class:`BackendUnavailable` (retried like an unreachable backend),
    a 4xx is a refusal that stops it."""
    answers = iter([(503, ["cannot fetch collateral"]), (403, ["dev mode is off"])])

    async def nonce(_request: web.Request) -> web.Response:
        status, reasons = next(answers)
        return web.json_response({"error": "x", "reasons": reasons}, status=status)

    app = web.Application()
    app.router.add_post("/v1/workers/nonce", nonce)
    server = TestServer(app)
    await server.start_server()
    keys = WorkerKeys.generate()
    claims = claims_for(keys, "n" * 32).model_dump(exclude={"nonce"})
    url = str(server.make_url("")).rstrip("/")
    try:
        with pytest.raises(ev.BackendUnavailable, match="HTTP 503: cannot fetch collateral"):
            await ev.register_with_backend(url, "cct_x", claims, keys.box_key, tee="dev")
        with pytest.raises(ev.AttestationRefused, match="dev mode is off"):
            await ev.register_with_backend(url, "cct_x", claims, keys.box_key, tee="dev")
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("field", "position", "words"),
    [
        ("tcb_info_signature", 10, "the collateral's own signature does not verify"),
        ("qe_identity_signature", 10, "the collateral's own signature does not verify"),
        ("pck_crl", -10, "the collateral's certificate revocation list"),
        ("pck_crl", 200, "the collateral's certificate revocation list"),
        ("root_ca_crl", -10, "the collateral's certificate revocation list"),
    ],
)
def test_corrupted_collateral_is_named_as_such_not_as_a_tampered_quote(
    field: str, position: int, words: str
) -> None:
    data = json.loads(COLLATERAL_90C06F)
    value: str = data[field]  # hex
    at = position % len(value)
    data[field] = value[:at] + ("1" if value[at] == "0" else "0") + value[at + 1 :]
    verdict = verify_quote(HOST_A, load_collateral(json.dumps(data)), AT_90C06F, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert verdict.reasons[0].startswith(words), verdict.reasons
    assert "tampered" not in verdict.reasons[0]


async def test_a_redis_fault_after_the_decision_gives_back_the_token_and_the_nonce(
    settings: Settings, admin: aioredis.Redis, redis_url: str
) -> None:
    """The backend's Redis user may not create ACL users (a misconfigured deployment): the
    accepted worker gets 503-worthy RedisError, and keeps its token and nonce to try again."""
    from backend.attestation.onboarding import OnboardingError
    from tests.support.attest import service

    name, password = "cocoon-test-no-acl-12", "pw-" + WorkerKeys.generate().fingerprint()
    await admin.execute_command(
        "ACL", "SETUSER", name, "reset", "on", f">{password}", "~*", "&*", "+@all", "-acl"
    )
    limited = aioredis.Redis.from_url(redis_url.replace("redis://", f"redis://{name}:{password}@"))
    try:
        onboarding = service(settings, limited, allow_dev=True)
        token = await store.issue_registration_token(admin, None, 600)
        nonce = (await onboarding.nonce(token))["nonce"]
        evidence = ev.dev_evidence(claims_for(WorkerKeys.generate(), nonce))
        with pytest.raises(Exception) as caught:
            await onboarding.register(token, evidence.model_dump(mode="json"))
        assert not isinstance(caught.value, OnboardingError)  # not a refusal: a Redis fault
        assert "acl" in str(caught.value).lower() or "permission" in str(caught.value).lower()
        grant = await store.lookup_token(admin, token)
        assert grant is not None and await store.check_nonce(admin, nonce, grant) is None
        assert 0 < await store.token_ttl_ms(admin, token) <= 600_000  # its life, not a new one
        # With a backend allowed to manage ACL users, the same token and nonce now succeed.
        reply = await service(settings, admin, allow_dev=True).register(
            token, evidence.model_dump(mode="json")
        )
        assert reply["accepted"] is True
    finally:
        await admin.execute_command("ACL", "DELUSER", name)
        await limited.aclose()
