"""TON payments: deposits credited once, payouts paid once, wallets linked by ton_proof.

Modules: ``comment`` (addresses, comment cells, top-up messages),
``toncenter`` (the TON Center HTTP client), ``transactions`` (what a deposit wallet's
transaction means), ``watcher`` (deposits), ``unclaimed`` (deposits nobody's memo matched, for
the operator), ``wallet`` (the hot wallet), ``payouts`` (the payout state machine),
``contracts`` (wallet contracts and the key a state init holds), ``proof`` (ton_proof),
``localnet`` (a local TON Center for tests and development), ``services`` (the watcher and the
payout sender run together), ``cli`` (the ``cocoon ton`` and ``cocoon watcher`` commands).

Its settings (``COCOON_TON__<NAME>``) are ``backend.settings.TonSettings``.
"""
