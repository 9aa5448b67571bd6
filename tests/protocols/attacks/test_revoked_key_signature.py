"""Attack: an update signed by a site key the operator revoked."""

from __future__ import annotations

from protocols.ledger import revoke_entry
from tests.protocols._factories import ORIGIN, assert_rejected, enrolled


def test_revoked_key_is_refused_after_revocation():
    c = enrolled()
    prepared = c.update("site-a", sequence=1)  # signed before the revocation
    c.append(revoke_entry(origin=ORIGIN, site_id="site-a", operator_keys=[c.operator]))
    assert_rejected(c, prepared.envelope, prepared.diff_bytes, "E_KEY_REVOKED")
    fresh = c.update("site-a", sequence=7, seed=9)
    assert_rejected(c, fresh.envelope, fresh.diff_bytes, "E_KEY_REVOKED")


def test_revocation_not_signed_by_operator_is_refused():
    import pytest

    from protocols.errors import LedgerError

    c = enrolled()
    env = revoke_entry(origin=ORIGIN, site_id="site-a", operator_keys=[c.site_keys["site-a"]])
    with pytest.raises(LedgerError) as ei:
        c.append(env)
    assert ei.value.reason_code == "E_SIG_THRESHOLD"
