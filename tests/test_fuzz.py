"""Bad input, generated (hypothesis): every parser that takes what people, wallets, TON Center,
workers or API clients send refuses garbage clearly (its own exception type, or a 4xx JSON
error), and never crashes, hangs or changes state.

Fast in CI (``max_examples`` 200 per parser); ``COCOON_FUZZ_EXAMPLES=10000`` for a long run.

The TON side's parsers (deposits, jettons, TON Center, TON Connect proofs) are fuzzed in
tests/test_fuzz_ton.py, the bot's Telegram updates and callback data in tests/test_fuzz_bot.py;
``json_values`` and ``FUZZ`` (tests/support/fuzz.py) are shared.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from backend.attestation.collateral import CollateralSource, load_collateral
from backend.attestation.policy import Policy
from backend.attestation.tdx import verify_quote
from backend.attestation.verifier import Verifier
from backend.money import AmountError, format_gram, parse_amount, parse_nano
from backend.settings import DEFAULT_MODEL, MAX_NANO, AttestationSettings, Settings
from tests.support.attest import AT, COLLATERAL, QUOTE
from tests.support.fuzz import FUZZ, json_values
from tests.support.ops import api_server, dev_settings
from workers.evidence import Evidence


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------ amounts people type


@FUZZ
@given(st.text(max_size=40) | st.from_regex(r"\s*-?[0-9]{0,25}([.,][0-9]{0,12})?\s*"))
@example("1e400")
@example("NaN")
@example("0.0000000001")
@example("٣")  # an Arabic-Indic digit: isdigit() but not ASCII
@example("9223372036854775808")
def test_typed_amounts_are_parsed_exactly_or_refused_with_a_reason(text: str) -> None:
    parsers = (
        parse_nano,
        lambda text, what: parse_amount(text, what, comma=False),
        lambda text, what: parse_amount(text, what, comma=True),
    )
    for parse in parsers:
        try:
            value = parse(text, "amount")
        except AmountError as error:
            assert str(error).startswith("amount ")
            continue
        assert isinstance(value, int) and 0 < value <= MAX_NANO


@FUZZ
@given(st.integers(min_value=1, max_value=MAX_NANO))
def test_every_amount_survives_being_shown_and_typed_back(nano: int) -> None:
    shown = format_gram(nano)
    for comma in (False, True):
        typed_back = parse_amount(shown, comma=comma)
        assert typed_back == parse_amount(shown.removesuffix(" GRAM"), comma=comma) == nano
    assert parse_nano(str(nano)) == nano


# ------------------------------------------------------------------------ TEE evidence


def policy() -> Policy:
    return Policy.model_validate({"tcb_statuses": ["UpToDate"], "images": []})


def mutated_quotes() -> st.SearchStrategy[bytes]:
    def flip(args: tuple[int, int]) -> bytes:
        index, value = args
        raw = bytearray(QUOTE)
        raw[index % len(raw)] ^= value or 1
        return bytes(raw)

    return (
        st.binary(max_size=2048)
        | st.integers(min_value=0, max_value=len(QUOTE)).map(lambda n: QUOTE[:n])
        | st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)).map(flip)
    )


@FUZZ
@given(mutated_quotes())
def test_a_corrupted_or_random_quote_is_refused_with_reasons(raw: bytes) -> None:
    verdict = verify_quote(raw, load_collateral(COLLATERAL), AT, policy())
    assert verdict.reasons and verdict.image is None


@FUZZ
@given(json_values())
def test_evidence_of_any_shape_is_refused_by_its_schema(data: Any) -> None:
    with pytest.raises(ValidationError):
        Evidence.model_validate(data)


@FUZZ
@given(raw=mutated_quotes())
async def test_the_verifier_refuses_random_quotes_before_trusting_anything(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    async def recorded(_url: str, _quote: bytes) -> Any:  # Intel's collateral service
        return load_collateral(COLLATERAL)

    verifier = Verifier(
        AttestationSettings(),
        policy=policy(),
        collateral=CollateralSource(
            "http://pccs.invalid", tmp_path_factory.mktemp("c"), fetch=recorded
        ),
        clock=lambda: AT,
    )
    claims = {
        "box_public_key": b64(b"\x01" * 32), "verify_key": b64(b"\x02" * 32),
        "model": DEFAULT_MODEL, "engine": "vllm", "engine_version": "1", "worker_version": "1",
        "nonce": "n" * 32,
    }  # fmt: skip
    evidence = Evidence.model_validate({"tee": "tdx", "claims": claims, "quote": b64(raw)})
    verdict = await verifier.verify(evidence)
    assert not verdict.accepted and verdict.reasons


# ------------------------------------------------------------------- OpenAI request bodies


def chat_bodies() -> st.SearchStrategy[Any]:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | json_values(1),
         "content": st.text(max_size=40) | json_values(3)},
    )  # fmt: skip
    body = st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from([DEFAULT_MODEL, "nope"]) | json_values(1),
            "messages": st.lists(message, max_size=3) | json_values(3),
            "max_tokens": st.integers(min_value=-5, max_value=10**12) | json_values(1),
            "temperature": st.floats() | json_values(1),
            "top_p": st.floats() | json_values(1),
            "stop": json_values(2),
            "n": json_values(1),
            "stream": json_values(1),
            "stream_options": json_values(2),
        },
    )
    return body | json_values()


@pytest.fixture
async def api_client(settings: Settings, redis_url: str) -> AsyncIterator[Any]:
    async with api_server(dev_settings(settings), with_metrics=False) as api:
        async with aiohttp.ClientSession() as http:
            yield api, http


@FUZZ
@given(body=chat_bodies(), raw=st.none() | st.binary(max_size=40))
@example(body={}, raw=b"\xff\xfe{")
@example(body={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}]}, raw=None)
async def test_any_chat_request_body_gets_a_json_error_and_changes_no_balance(
    api_client: tuple[Any, aiohttp.ClientSession], body: Any, raw: bytes | None
) -> None:
    api, http = api_client
    before = await api.ledger.balances(api.user_id)
    async with http.post(
        f"{api.url}/v1/chat/completions",
        data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"},
    ) as response:
        reply = await response.json(content_type=None)
        status = response.status
    # No worker runs: a valid request can only end in "no worker" (503), never in a crash.
    assert 400 <= status < 500 or (status == 503 and reply["error"]["code"] == "no_worker")
    assert set(reply["error"]) >= {"message", "type", "code"}
    assert await api.ledger.balances(api.user_id) == before


# ------------------------------------------------------------- Mini App initData (hook)
# The bot's parsers (updates, callback data) are fuzzed in the bot's own tests with the same
# ``FUZZ`` settings and ``json_values``; the Mini App's initData verifier is fuzzed here.

BOT_TOKEN = "123456:TEST-token"


def init_data() -> st.SearchStrategy[str]:
    """Random strings, and correctly *signed* initData whose fields are garbage."""
    from miniapp.auth import sign_init_data

    field_values = st.text(max_size=40) | json_values(4).map(json.dumps)
    fields = st.dictionaries(
        st.sampled_from(["user", "auth_date", "query_id", "chat", "start_param", "x"]),
        field_values | st.integers(min_value=-(2**70), max_value=2**70).map(str),
        max_size=5,
    )
    user = st.fixed_dictionaries(
        {"id": st.integers(min_value=-(2**64), max_value=2**64) | json_values(1)},
        optional={"first_name": json_values(1), "language_code": json_values(1)},
    )
    plausible = st.fixed_dictionaries(
        {
            "user": user.map(json.dumps),
            "auth_date": st.integers(min_value=1_800_000_000 - 90_000, max_value=1_800_000_100).map(
                str
            ),
        }
    )
    signed = (fields | plausible).map(lambda f: sign_init_data(f, BOT_TOKEN))
    return st.text(max_size=200) | signed


@FUZZ
@given(init_data())
def test_any_init_data_is_verified_or_refused_with_an_init_data_error(raw: str) -> None:
    from miniapp.auth import InitDataError, InitDataVerifier

    verifier = InitDataVerifier(BOT_TOKEN, max_age_s=86_400)
    try:
        caller = verifier.verify(raw, now=1_800_000_000)
    except InitDataError:
        return
    assert isinstance(caller.telegram_id, int) and not caller.dev
    assert 0 < caller.telegram_id < 2**52  # a Telegram user id, never 0 or negative
