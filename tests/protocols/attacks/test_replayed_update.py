"""Attack: an accepted update submitted again (byte-identical), or re-signed with an old
sequence number."""

from __future__ import annotations

from tests.protocols._factories import assert_rejected, enrolled


def test_identical_replay():
    c = enrolled()
    u = c.update("site-a", sequence=1)
    c.submit(u)
    # The conditions it adds now exist too, but the sequence check comes first.
    assert_rejected(c, u.envelope, u.diff_bytes, "E_SEQUENCE_REPLAY")


def test_new_content_old_sequence():
    c = enrolled()
    c.submit(c.update("site-a", sequence=3, seed=1))
    for seq in (1, 2, 3):
        u = c.update("site-a", sequence=seq, seed=2)
        assert_rejected(c, u.envelope, u.diff_bytes, "E_SEQUENCE_REPLAY")


def test_replay_of_another_sites_sequence_is_independent():
    c = enrolled("site-a", "site-b")
    c.submit(c.update("site-a", sequence=1, seed=1))
    c.submit(c.update("site-b", sequence=1, seed=2))
