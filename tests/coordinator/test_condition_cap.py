"""The operator's cap on total conditions (per reference, per site): refused at the server with
E_CONDITION_CAP, nothing appended, and a cap that cannot hold is a config error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coordinator.config import CONFIG_FILENAME, load_config
from protocols.errors import ConfigError
from tests.coordinator.conftest import fetch_base, make_consortium, make_site_update, running_server

pytestmark = pytest.mark.network


def _set_limits(state: Path, **limits: int) -> None:
    path = state / CONFIG_FILENAME
    doc = yaml.safe_load(path.read_text())
    doc["limits"].update(limits)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_condition_cap_per_site_and_per_reference_at_the_server(tmp_path: Path) -> None:
    cons = make_consortium(tmp_path, sites=("site-a", "site-b"))
    n_ref = len(cons.reference.conditions)
    _set_limits(cons.state, max_conditions_per_site=2, max_conditions_per_reference=n_ref + 3)
    with running_server(cons.state) as server, server.client(cons) as c:
        base = fetch_base(c, cons)
        a, b = cons.sites["site-a"], cons.sites["site-b"]
        codes = []
        for site, m in ((a, 2), (a, 1), (b, 1), (b, 1)):
            u = make_site_update(site, base, m=m)
            res = c.submit_update(u.envelope, u.diff_bytes)
            codes.append(res.rejection.reason_code if res.rejection else "ok")
            if res.rejection:
                msg = res.rejection.message
                assert "cap" in msg and "max_conditions_per_" in msg  # names the fix
                site.sequence -= 1
        assert codes == ["ok", "E_CONDITION_CAP", "ok", "E_CONDITION_CAP"]
        size, _root, grown = fetch_base(c, cons)
        assert size == base[0] + 2  # the two accepted updates, nothing for the refused ones
        assert len(grown.conditions) == n_ref + 3


def test_per_site_cap_above_the_per_reference_cap_is_a_config_error(tmp_path: Path) -> None:
    cons = make_consortium(tmp_path, sites=())
    _set_limits(cons.state, max_conditions_per_site=10, max_conditions_per_reference=5)
    with pytest.raises(ConfigError, match="max_conditions_per_site"):
        load_config(cons.state)
