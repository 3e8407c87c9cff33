"""What the generated (hypothesis) tests share: one settings profile (``FUZZ``: the number of
examples from ``COCOON_FUZZ_EXAMPLES``, 200 by default; 10000 for a long run) and any JSON
value (``json_values``)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("COCOON_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value: what a client, a wallet or an API can send."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=5)
            | st.dictionaries(st.text(max_size=12), children, max_size=6)
        ),
        max_leaves=max_leaves,
    )
