"""Worker attestation: evidence verification, the image allow-list, onboarding, Redis ACLs.

Kept light at import time: :mod:`backend.settings` imports :mod:`.settings` from here, and the
worker node reads the settings too. ``dcap-qvl`` is imported only where a quote is verified.
"""
