"""Attack: after a key rotation, an update signed with the old (rotated-out) key."""

from __future__ import annotations

from protocols.ledger import rotate_entry
from tests.protocols._factories import ORIGIN, assert_rejected, det_key, enrolled


def test_old_key_after_rotation():
    c = enrolled()
    old = c.site_keys["site-a"]
    new = det_key(77)
    c.append(rotate_entry(origin=ORIGIN, site_id="site-a", old_key=old, new_key=new, operator_keys=[c.operator]))
    u = c.update("site-a", key=old)
    assert_rejected(c, u.envelope, u.diff_bytes, "E_KEY_ROTATED")
    c.site_keys["site-a"] = new
    c.submit(c.update("site-a"))
