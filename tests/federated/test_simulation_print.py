"""Ray's driver replaces ``builtins.print`` (its tqdm integration) unless told not to; numba then
cannot compile any nopython function that prints, and ``numba.get_num_threads`` does, so the
first pynndescent k-NN search after a simulation in the same process failed with a TypingError
(seen in CI). The simulation turns Ray's patch off and puts ``print`` back whatever happens."""

from __future__ import annotations

import builtins

import pytest

pytestmark = [pytest.mark.flower]


def test_simulation_environment_turns_off_rays_print_patch():
    from coordinator.federated_deploy import FLOWER_ENV, flower_environment

    assert FLOWER_ENV["RAY_TQDM_PATCH_PRINT"] == "0"
    assert flower_environment()["RAY_TQDM_PATCH_PRINT"] == "0"


def test_simulation_restores_print_replaced_during_the_run(tmp_path, shared_data, monkeypatch):
    import flwr.simulation

    from protocols.federated import FederationError
    from scarches_fl_cli.federated_simulation import simulate

    original = builtins.print

    def replaced_print(*args, **kwargs):  # what Ray's safe_print stands for
        original(*args, **kwargs)

    def run_like_ray(**kwargs):
        builtins.print = replaced_print  # the run ends without a result

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_like_ray)
    try:
        with pytest.raises(FederationError, match="without a result"):
            simulate(shared_data / "panc8_sub_nebula.h5ad", batch_key="batch", n_sites=2,
                     rounds=1, out=tmp_path / "out", batches=["celseq", "indrop1"], seed=0)
        assert builtins.print is original
    finally:
        builtins.print = original


def test_numba_compiles_a_printing_function_after_the_simulation_helper_ran(tmp_path,
                                                                            shared_data,
                                                                            monkeypatch):
    """The failure itself: numba typing ``get_num_threads`` (which holds a ``print``)."""
    import flwr.simulation
    import numba

    from protocols.federated import FederationError
    from scarches_fl_cli.federated_simulation import simulate

    original = builtins.print
    monkeypatch.setattr(flwr.simulation, "run_simulation",
                        lambda **kw: setattr(builtins, "print", lambda *a, **k: None))
    try:
        with pytest.raises(FederationError):
            simulate(shared_data / "panc8_sub_nebula.h5ad", batch_key="batch", n_sites=2,
                     rounds=1, out=tmp_path / "out", batches=["celseq", "indrop1"], seed=0)

        @numba.njit
        def threads() -> int:
            return numba.get_num_threads()

        assert threads() >= 1
    finally:
        builtins.print = original
