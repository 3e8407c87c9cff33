"""Bad input from the TON side, generated (hypothesis): deposit comments and transactions of
any shape, jetton notifications, TON Center's replies and TON Connect proofs are each data or
refused with their own exception, never credited by mistake, never a crash or a hang.

Fast in CI (``max_examples`` 200 per parser); ``COCOON_FUZZ_EXAMPLES=10000`` for a long run.
The other parsers' fuzz tests: tests/test_fuzz.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import example, given
from hypothesis import strategies as st
from pytoniq_core import Address, begin_cell

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, TonDepositStatus, User
from backend.settings import MAX_NANO
from backend.ton.comment import comment_cell, decode_comment, raw_address
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer, jetton_notification
from backend.ton.proof import ProofError, verify_proof
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.transactions import classify
from backend.ton.watcher import DepositWatcher
from backend.users import get_or_create_user
from tests.support.fuzz import FUZZ, json_values

DEPOSIT = "0:" + "D3" * 32


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------- deposit comments and txs


@FUZZ
@given(
    st.none()
    | st.text(max_size=60)
    | st.binary(max_size=200).map(b64)
    | st.binary(max_size=120).map(
        lambda raw: b64(begin_cell().store_bytes(raw[:127]).end_cell().to_boc())
    )
)
def test_any_message_body_decodes_to_a_memo_or_a_note(body: str | None) -> None:
    decoded = decode_comment(body)
    assert (decoded.memo is None) != (decoded.note is None)


@FUZZ
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
def test_a_text_comment_comes_back_as_written(text: str) -> None:
    decoded = decode_comment(b64(comment_cell(text).to_boc()))
    assert decoded.memo == text


@FUZZ
@given(json_values())
def test_any_transaction_shape_is_classified_without_raising(tx: Any) -> None:
    found = classify(tx if isinstance(tx, dict) else {"in_msg": tx}, DEPOSIT)
    if found.status == TonDepositStatus.CREDITED:
        assert found.amount > 0 and found.source and found.memo is not None
    else:
        assert found.memo is None


def garbage_transactions() -> st.SearchStrategy[dict[str, Any]]:
    """Transactions with a usable id and anything else, or no usable id at all."""
    with_id = st.fixed_dictionaries(
        {
            "lt": st.integers(min_value=1, max_value=2**62).map(str),
            "hash": st.binary(min_size=32, max_size=32).map(b64),
        },
        optional={
            "in_msg": json_values()
            | st.fixed_dictionaries(
                {},
                optional={
                    "source": json_values(2),
                    "value": json_values(2) | st.integers(min_value=-(2**64), max_value=2**64),
                    "bounced": json_values(2),
                    "destination": json_values(2),
                    "message_content": json_values(4)
                    | st.fixed_dictionaries({"body": st.binary(max_size=80).map(b64)}),
                },
            ),
            "description": json_values(4),
            "now": json_values(2),
        },
    )
    return with_id | st.dictionaries(st.sampled_from(["lt", "hash", "in_msg"]), json_values(3))


@pytest.fixture
async def watcher(db: Database) -> AsyncIterator[tuple[DepositWatcher, int]]:
    user = await get_or_create_user(db, 1234)
    async with TonCenter("http://127.0.0.1:9") as api:  # never called: handle() only
        yield DepositWatcher(db, Ledger(db), api, DEPOSIT), user.id


@FUZZ
@given(tx=garbage_transactions())
async def test_garbage_transactions_are_recorded_or_refused_and_never_credited(
    watcher: tuple[DepositWatcher, int], tx: dict[str, Any]
) -> None:
    w, user_id = watcher
    try:
        deposit = await w.handle(tx)
    except ValueError as error:
        assert str(error).startswith("not a transaction")
    else:
        assert deposit.status != TonDepositStatus.CREDITED
    assert (await w.ledger.balances(user_id)).available == 0
    assert await w.ledger.balance(AccountKind.TON_IN) == 0


USDT = "0:" + "7E" * 32
GRAM = "0:" + "6A" * 32  # a jetton named GRAM: not the native coin
USDT_RATE = 400


@pytest.fixture
async def usdt_watcher(
    db: Database,
) -> AsyncIterator[tuple[DepositWatcher, LocalTonCenter, User]]:
    user = await get_or_create_user(db, 4321)
    net = LocalTonCenter()
    net.deploy(DEPOSIT)
    net.add_jetton(USDT)
    net.add_jetton(GRAM)
    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
        w = DepositWatcher(
            db, Ledger(db), api, DEPOSIT, usdt_master=USDT, usdt_nano_per_micro=USDT_RATE
        )
        yield w, net, user


@FUZZ
@given(
    units=st.integers(min_value=0, max_value=2**120 - 1)
    | st.integers(min_value=0, max_value=10**12),
    sender=st.sampled_from(["usdt", "usdt_other_owner", "gram", "fake", "external"]),
    comment=st.none() | st.sampled_from(["memo", "memo_lower"]) | st.text(max_size=30),
    value=st.integers(min_value=0, max_value=10**9),
    twice=st.booleans(),
)
async def test_jetton_notifications_credit_usdt_only_from_our_usdt_wallet_once(
    usdt_watcher: tuple[DepositWatcher, LocalTonCenter, User],
    units: int,
    sender: str,
    comment: str | None,
    value: int,
    twice: bool,
) -> None:
    w, net, user = usdt_watcher
    memo = {"memo": user.deposit_memo, "memo_lower": user.deposit_memo.lower()}
    text = memo.get(comment or "", comment)
    source = {
        "usdt": net.jetton_wallet(USDT, DEPOSIT),
        "usdt_other_owner": net.jetton_wallet(USDT, "0:" + "0B" * 32),
        "gram": net.jetton_wallet(GRAM, DEPOSIT),
        "fake": "0:" + "FA" * 32,
        "external": None,
    }[sender]
    body = jetton_notification(units, "0:" + "A1" * 32, text)
    tx = net.add_incoming(DEPOSIT, value, body=body, source=source)
    before = (await w.ledger.balances(user.id)).available
    for _ in range(2 if twice else 1):
        deposit = await w.handle(tx)
    gained = (await w.ledger.balances(user.id)).available - before
    ours = sender == "usdt" and text is not None and text.strip().upper() == user.deposit_memo
    expected = units * USDT_RATE if ours and 0 < units * USDT_RATE <= MAX_NANO else 0
    assert gained == expected
    assert (deposit.status == TonDepositStatus.CREDITED) == (expected > 0)
    assert await w.ledger.balance(AccountKind.TON_IN) == 0  # never credited as the coin
    assert (await w.ledger.audit()).ok


class Replies:
    """A TON Center stand-in at the network boundary that answers whatever it is told to."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b"{}"

    async def handle(self, _request: web.Request) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type="application/json")


@pytest.fixture
async def toncenter() -> AsyncIterator[tuple[Replies, TonCenter]]:
    replies = Replies()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", replies.handle)
    server = TestServer(app)
    await server.start_server()
    async with TonCenter(str(server.make_url(""))) as api:
        yield replies, api
    await server.close()


@FUZZ
@given(
    status=st.sampled_from([200, 200, 200, 400, 404, 429, 500, 502]),
    body=json_values().map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=60)
    | st.just(b'{"transactions": [{"lt": "5"}]}')
    | st.builds(
        lambda kind, value, code: json.dumps(
            {"exit_code": code, "stack": [{"type": kind, "value": value}] * 3}
        ).encode(),
        st.sampled_from(["cell", "slice", "num"]),
        st.binary(max_size=80).map(b64)
        | st.just(b64(begin_cell().store_address(None).end_cell().to_boc()))
        | st.just(b64(begin_cell().store_address(Address(DEPOSIT)).end_cell().to_boc()))
        | json_values(2),
        st.sampled_from([0, 0, -13, 7]),
    ),
)
async def test_any_toncenter_reply_is_data_or_a_toncenter_error(
    toncenter: tuple[Replies, TonCenter], status: int, body: bytes
) -> None:
    replies, api = toncenter
    replies.status, replies.body = status, body
    calls = (
        api.transactions(DEPOSIT, start_lt=1, limit=10),
        api.transactions_by_message("00" * 32),
        api.wallet_seqno(DEPOSIT),
        api.jetton_wallet_address(DEPOSIT, DEPOSIT),
        api.jetton_wallet_master(DEPOSIT),
    )
    for call in calls:
        try:
            result = await call
        except TonCenterError:
            continue
        assert status == 200
        if result is None or isinstance(result, str):  # an address read from a stack
            assert result is None or raw_address(result) == result
        elif isinstance(result, list):
            assert all(isinstance(tx, dict) and int(tx["lt"]) > 0 for tx in result)
        else:
            assert 0 <= result < 2**32


# -------------------------------------------------------------------------- ton_proof


def proofs() -> st.SearchStrategy[tuple[Any, Any]]:
    address = st.just("0:" + "AB" * 32) | st.text(max_size=70) | json_values(2)
    account = st.fixed_dictionaries(
        {"address": address, "walletStateInit": st.binary(max_size=64).map(b64) | json_values(2)},
        optional={
            "network": st.sampled_from(["-239", "-3"]) | json_values(1),
            "publicKey": json_values(1),
        },
    )
    proof = st.fixed_dictionaries(
        {
            "timestamp": st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats()
            | json_values(1),
            "domain": st.fixed_dictionaries(
                {"value": st.just("cocoon.example.org") | st.text(max_size=30)},
                optional={"lengthBytes": json_values(1) | st.floats()},
            )
            | json_values(2),
            "signature": st.binary(max_size=80).map(b64) | json_values(1),
            "payload": st.text(max_size=80) | json_values(1),
        }
    )
    return st.tuples(account | json_values(3), proof | json_values(3))


@FUZZ
@given(proofs())
@example(({"address": "0:" + "AB" * 32, "walletStateInit": ""}, {"timestamp": float("inf")}))
def test_any_ton_proof_is_refused_with_a_proof_error(pair: tuple[Any, Any]) -> None:
    account, proof = pair
    with pytest.raises(ProofError):
        verify_proof(
            account, proof, allowed_domains=["cocoon.example.org"], max_age_s=900, now=10**9
        )
