"""Attack: condition names with path tricks, control characters or Unicode confusables, which
could escape a namespace in file paths, logs or UIs downstream."""

from __future__ import annotations

import pytest

from tests.protocols._factories import assert_rejected, enrolled


@pytest.mark.parametrize(
    "name",
    [
        "site-a/../site-b/x",
        "site-a/..",
        "site-a/.",
        "../site-a/x",
        "site-a//x",
        "site-a/x/y",
        "site-a\\x",
        "/site-a/x",
        "site-a/",
        "site-a",
        "site-a/x\n",
        "site-a/x\x00",
        "site-a/\x1b[31mred",
        "site-a/x y",
        "site\u2010a/x",  # Unicode hyphen
        "site-a/\u0445",  # Cyrillic small ha, looks like 'x'
        "site-a/x\u200b",  # zero-width space
        "sіte-a/x",  # Cyrillic i
        "SITE-A/x",
        "site-a/" + "x" * 129,
    ],
)
def test_bad_names(name):
    c = enrolled()
    u = c.update("site-a", names=[name])
    assert_rejected(c, u.envelope, u.diff_bytes, "E_CONDITION_NAME")
