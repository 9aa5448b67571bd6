"""The CVAE module: loss terms against dense formulas, freezing by construction, fast path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scarches_fl.module import CVAE, default_hyperparameters, tensor_specs
from scarches_fl.train import CellData, TrainingConfig, _minibatch, fit, precompute_first_layer

G, C_OLD, C_NEW = 30, 3, 2


def _data(n=40, g=G, n_cond=C_OLD + C_NEW, seed=0, cond_lo=0):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(n, g)).astype(np.float32)
    x[rng.random((n, g)) < 0.5] = 0
    x[:, 0] += 1  # no empty cells
    cond = rng.integers(cond_lo, n_cond, size=n)
    return CellData(sp.csr_matrix(x), cond), x


def _module(mode="reference", likelihood="nb", dispersion="gene", n_new=C_NEW, seed=0):
    hp = default_hyperparameters(likelihood=likelihood, dispersion=dispersion, n_hidden=16,
                                 n_latent=4)
    base = CVAE(hp, G, C_OLD, mode="reference")
    base.init_reference(torch.Generator().manual_seed(seed))
    if mode == "reference":
        return base, base
    m = CVAE(hp, G, C_OLD + n_new, n_new_conditions=n_new, mode=mode)
    m.load_tensors(base.export_tensors())
    m.init_new_conditions()
    return base, m


def _dense_nb_ll(x, mu, theta):
    eps = 1e-8
    log_theta_mu = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu) + x * (torch.log(mu + eps)
            - log_theta_mu) + torch.lgamma(x + theta) - torch.lgamma(theta)
            - torch.lgamma(x + 1)).sum()


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_sparse_nb_loss_equals_dense_formula(dispersion):
    _, m = _module(mode="full", dispersion=dispersion)
    data, x = _data()
    mb = _minibatch(m, data, np.arange(40), torch.device("cpu"), h0=None, const=None,
                    need_input=True)
    out = torch.randn(40, G, generator=torch.Generator().manual_seed(1))
    got = m.reconstruction(mb, out)
    mu = torch.softmax(out, -1) * mb.lib[:, None]
    theta = torch.exp(m.log_theta(mb.cond)).expand(40, G)
    want = -_dense_nb_ll(torch.from_numpy(x), mu, theta)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)


def test_sparse_mse_loss_equals_dense_formula():
    _, m = _module(mode="full", likelihood="trvae")
    data, x = _data()
    mb = _minibatch(m, data, np.arange(40), torch.device("cpu"), h0=None, const=None,
                    need_input=True)
    out = torch.randn(40, G, generator=torch.Generator().manual_seed(2))
    xt = torch.from_numpy(x)
    y = torch.log1p(xt / xt.sum(1, keepdim=True) * 1e4)
    want = ((torch.relu(out) - y) ** 2).sum()
    torch.testing.assert_close(m.reconstruction(mb, out), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(mb.x_in, y)


def test_mmd_is_zero_for_identical_groups_and_positive_otherwise():
    _, m = _module(likelihood="trvae")
    a = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0] * 10 + [1] * 10)
    assert float(m.mmd(torch.cat([a, a]), cond)) == pytest.approx(0.0, abs=1e-5)
    assert float(m.mmd(torch.cat([a, a + 3]), cond)) > 0.1


def test_trainable_parameter_counts_per_mode():
    h, lat = 16, 4
    counts = {mode: _module(mode=mode)[1].trainable_parameter_count()
              for mode in ("conditions", "input_layers", "full")}
    assert counts["conditions"] == 2 * h * C_NEW
    first = h * G + h * (C_OLD + C_NEW) + h + h * lat + h * (C_OLD + C_NEW) + h
    assert counts["input_layers"] == first
    total = sum(int(np.prod(s.shape)) for s in tensor_specs(
        _module()[1].hp, G, C_OLD + C_NEW).values())
    assert counts["full"] == total
    # gene-batch dispersion adds the new conditions' dispersion columns in conditions mode
    gb = _module(mode="conditions", dispersion="gene-batch")[1].trainable_parameter_count()
    assert gb == 2 * h * C_NEW + G * C_NEW


@pytest.mark.parametrize("likelihood", ["nb", "trvae"])
def test_conditions_mode_is_bit_identical_even_with_weight_decay(likelihood):
    base, m = _module(mode="conditions", likelihood=likelihood)
    before = base.export_tensors()
    new_before = {n: t.clone() for n, t in m.named_parameters()}
    data, _ = _data(cond_lo=C_OLD)
    cfg = TrainingConfig(max_epochs=3, batch_size=16, lr=0.05, weight_decay=0.5, progress=False,
                         validation_fraction=0.2)
    hist = fit(m, data, cfg)
    assert hist["trainable_parameters"] == 2 * 16 * C_NEW
    after = m.export_tensors()
    for name, spec in m.specs.items():
        t = torch.from_numpy(after[name])
        if spec.role == "condition":
            t = t.narrow(spec.axis, 0, C_OLD)
        assert torch.equal(t, torch.from_numpy(before[name])), name
    assert all(not torch.equal(p, new_before[n]) for n, p in m.named_parameters())
    # only the new columns are parameters; everything else is a buffer
    assert {n for n, _ in m.named_parameters()} == {
        "encoder__layers__0__weight_s__new", "decoder__layers__0__weight_s__new"}


def test_input_layers_mode_changes_only_first_layers():
    base, m = _module(mode="input_layers")
    before = base.export_tensors()
    data, _ = _data(cond_lo=C_OLD)
    fit(m, data, TrainingConfig(max_epochs=2, batch_size=16, lr=0.01, progress=False))
    after = m.export_tensors()
    first = {n for n in m.specs if ".layers.0." in n}
    for name, spec in m.specs.items():
        t = torch.from_numpy(after[name])
        if spec.role == "condition":
            t = t.narrow(spec.axis, 0, C_OLD)
        same = torch.equal(t, torch.from_numpy(before[name]))
        assert same == (name not in first), name


def test_fast_path_loss_equals_full_forward():
    _, m = _module(mode="conditions")
    m.eval()
    data, _ = _data(cond_lo=C_OLD)
    h0 = precompute_first_layer(m, data)
    idx = np.arange(0, 40, 3)
    full = _minibatch(m, data, idx, torch.device("cpu"), h0=None, const=None, need_input=True)
    fast = _minibatch(m, data, idx, torch.device("cpu"), h0=h0, const=None, need_input=True)
    assert fast.x_in is None and fast.h0 is not None
    a = m.loss(full, generator=torch.Generator().manual_seed(0))
    b = m.loss(fast, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-4)


def test_training_is_bit_reproducible_for_a_seed():
    outs = []
    for _ in range(2):
        base, m = _module(mode="reference")
        data, _ = _data(n_cond=C_OLD)
        fit(base, data, TrainingConfig(max_epochs=2, batch_size=8, seed=3, progress=False))
        outs.append(base.export_tensors())
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k]), k


def test_cuda_request_without_cuda_is_a_clear_error():
    from scarches_fl.data import DataError
    from scarches_fl.train import resolve_device

    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA is not available"):
            resolve_device("cuda")
