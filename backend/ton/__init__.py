"""TON payments: deposits credited once, payouts paid once, wallets linked by ton_proof.

Modules: ``config`` (settings), ``comment`` (addresses, comment cells, top-up messages),
``toncenter`` (the TON Center HTTP client), ``watcher`` (deposits), ``wallet`` (the hot wallet),
``payouts`` (the payout state machine), ``proof`` (ton_proof), ``localnet`` (a local TON Center
for tests and development), ``cli`` (the ``cocoon ton`` and ``cocoon watcher`` commands).

Nothing heavy is imported here: ``backend.settings`` imports ``backend.ton.config``.
"""
