"""Worker attestation: evidence verification, the image allow-list, onboarding, Redis ACLs.

Modules: ``verifier`` (evidence to a verdict), ``tdx`` (TDX quotes), ``collateral`` (Intel's
collateral, fetched and cached), ``nvidia`` (GPU evidence), ``policy`` (the allow-list),
``onboarding`` (the flow: token, nonce, evidence, credentials), ``routes`` (its HTTP side
and keeper task), ``store`` (registration and renewal tokens, nonces), ``acl``
(workers' Redis users), ``report`` (the public attestation report), ``checks`` (a client's
own checks of a report and of receipts), ``commands`` (``cocoon provider``, ``cocoon attest``
and ``cocoon verify-receipt``). Its settings
(``COCOON_ATTESTATION__<NAME>``) are ``backend.settings.AttestationSettings``. ``dcap-qvl`` is
imported only where a quote is verified.
"""
