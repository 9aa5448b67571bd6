"""The Python in the docs runs as written: every ```python block of docs/model.md, in order, in
one namespace, then the README's three-line mapping on the bundle and query it made. They run
in a folder beside a ``shared`` link, so the docs' ``../shared/data/...`` paths hold."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_PYTHON = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[str]:
    blocks = _PYTHON.findall(path.read_text())
    assert blocks, f"{path.name} lost its Python examples"
    return blocks


def _run(blocks: list[str], namespace: dict, source: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks):
            exec(compile(block, f"{source} block {i + 1}", "exec"), namespace)  # noqa: S102
    return out.getvalue()


@pytest.fixture(scope="module")
def model_md(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("docs-python")
    (root / "shared").symlink_to(shared_data.parent, target_is_directory=True)
    work = root / "repo"
    work.mkdir()
    namespace: dict = {"__name__": "__docs__"}
    with contextlib.chdir(work):
        printed = _run(_blocks(ROOT / "docs" / "model.md"), namespace, "docs/model.md")
    return work, namespace, printed


def test_model_md_python_examples_run(model_md) -> None:
    work, ns, printed = model_md
    query = ns["query"]
    assert (work / "ref-py" / "manifest.json").is_file()
    assert query.obsm["X_scarches"].shape == (query.n_obs, 10)
    assert {"cell_type_pred", "cell_type_uncertainty"} <= set(query.obs.columns)
    assert list(query.uns["scarches_fl"]["new_conditions"]) == ns["mapped"].new_conditions
    assert ns["mapped"].new_conditions == ["query/celseq2", "query/smartseq2"]
    assert float(np.abs(ns["z"] - query.obsm["X_scarches"]).max()) < 1e-5
    assert 0.0 <= ns["metrics"]["label_transfer"]["accuracy"] <= 1.0
    assert "bytes of new condition columns" in printed and "counts read from X" in printed


def test_readme_python_mapping_runs(model_md) -> None:
    work, ns, _ = model_md
    (work / "ref").symlink_to(work / "ref-py", target_is_directory=True)
    fresh = ns["data"][~ns["data"].obs["batch"].isin(ns["reference_studies"])].copy()
    fresh.write_h5ad(work / "query.h5ad")
    (block,) = _blocks(ROOT / "README.md")
    assert len(block.strip().splitlines()) == 3, "the README promises a three-line mapping"
    readme: dict = {"__name__": "__readme__"}
    with contextlib.chdir(work):
        _run([block], readme, "README.md")
    query = readme["query"]
    # the same reference, query and seed as docs/model.md: the same embedding (up to float
    # rounding: torch's thread count follows the machine's load) and labels
    np.testing.assert_allclose(query.obsm["X_scarches"], ns["query"].obsm["X_scarches"], atol=1e-5)
    np.testing.assert_array_equal(
        query.obs["cell_type_pred"].to_numpy(), ns["query"].obs["cell_type_pred"].to_numpy()
    )
