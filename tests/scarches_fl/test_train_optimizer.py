"""train.fit's own Adam is torch.optim.Adam where it says so (L2 weight decay added to the
gradient, bias-corrected moments, eps outside the square root), and federated local training
runs through train.fit (one training loop for reference, surgery and federated rounds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scarches_fl.train import _Adam


@pytest.mark.parametrize("weight_decay,eps", [(0.0, 1e-8), (1e-6, 0.01), (0.1, 1e-3)])
def test_adam_matches_torch_optim_adam(weight_decay: float, eps: float) -> None:
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = _Adam(ours, lr=1e-2, weight_decay=weight_decay, eps=eps)
    topt = torch.optim.Adam(ref, lr=1e-2, weight_decay=weight_decay, eps=eps)
    target = torch.randn(7, generator=gen)
    for step in range(50):
        x = torch.randn(3, 7, generator=gen)
        for params, o in ((ours, opt), (ref, topt)):
            loss = ((x @ params[0] + params[1]).sum(1) - target[:3]).pow(2).mean()
            if step % 7 == 3:  # a step where one parameter has no gradient
                loss = (x @ params[0]).pow(2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(),
                                       rtol=1e-5, atol=1e-6)


def test_federated_local_training_is_train_fit(shared_data, monkeypatch) -> None:
    """local_train hands its epochs, batch size, KL weight and FedProx term to train.fit."""
    import anndata as ad

    from scarches_fl import _federated as F
    from scarches_fl import train
    from scarches_fl.module import default_hyperparameters

    a = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    a = a[a.obs["batch"].isin(["indrop3"])][:300, :40].copy()
    conds = ["s/indrop3"] * a.n_obs
    data = F.make_site_dataset(a.X, conds, ["r/x", "s/indrop3"], seed=0)
    hp = default_hyperparameters(n_hidden=8, n_layers=1, n_latent=3)
    init = F.initial_tensors(hp, a.n_vars, 2, seed=0)
    seen = []
    real_fit = train.fit

    def spy(module, cells, config):
        seen.append(config)
        return real_fit(module, cells, config)

    monkeypatch.setattr(train, "fit", spy)
    cfg = F.LocalTrainingConfig(epochs=2, batch_size=64, kl_weight=0.25, prox_mu=0.5, seed=3)
    res = F.local_train(hp, a.n_vars, 2, init, data, cfg)
    (config,) = seen
    assert (config.max_epochs, config.batch_size, config.kl_weight, config.prox_mu) == (
        2, 64, 0.25, 0.5)
    assert config.validation_fraction == 0.0 and not config.early_stopping
    assert config.prox_params and all("weight_s" not in n for n in config.prox_params)
    assert res.n_train == data.n_train and np.isfinite(res.train_loss)
    # FedProx pulls the shared weights towards the received ones.
    free = F.local_train(hp, a.n_vars, 2, init, data,
                         F.LocalTrainingConfig(epochs=2, batch_size=64, kl_weight=0.25, seed=3))
    name = "encoder.layers.0.weight_x"
    drift = {k: float(np.abs(r.tensors[name] - init[name]).sum()) for k, r in
             (("prox", res), ("free", free))}
    assert drift["prox"] < drift["free"]
