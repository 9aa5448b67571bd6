"""Attack: a site adds conditions under another site's (or the reference's) namespace, or
re-uses an existing condition name."""

from __future__ import annotations

import pytest

from tests.protocols._factories import assert_rejected, enrolled


@pytest.mark.parametrize("name", ["site-b/batch1", "ref/study9", "site-ab/x", "site/x"])
def test_other_namespace(name):
    c = enrolled("site-a", "site-b")
    u = c.update("site-a", names=[name])
    assert_rejected(c, u.envelope, u.diff_bytes, "E_CONDITION_NAMESPACE")


def test_existing_condition_name():
    c = enrolled()
    c.submit(c.update("site-a", sequence=1, names=["site-a/b1"]))
    u = c.update("site-a", sequence=2, names=["site-a/b1"])
    assert_rejected(c, u.envelope, u.diff_bytes, "E_CONDITION_EXISTS")
    u = c.update("site-a", sequence=2, m=2, names=["site-a/b2", "site-a/b2"])
    assert_rejected(c, u.envelope, u.diff_bytes, "E_CONDITION_EXISTS")
