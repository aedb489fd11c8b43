"""The alternatives CEMA is compared with, run in-process in PyTorch over the same stream (batches in order,
no reset between corruptions): no adaptation, BatchNorm statistics adaptation, and Tent (entropy minimisation by
backprop on the device itself, the thing CEMA avoids)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.demo.models import mean_std, to_tensor

#: Tent's CIFAR-10-C setting (Wang et al., ICLR 2021): Adam, lr 1e-3, affine BN parameters, batch statistics.
TENT_LR = 1e-3


def no_adapt(model: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Predictions of the source model as is."""
    torch = lazy_import("torch", extra="export")
    mean, std = mean_std(model)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return np.concatenate([model(to_tensor(images[i : i + batch], mean, std)).argmax(1).numpy()
                               for i in range(0, len(images), batch)])


def _batch_stats(model: Any) -> Any:
    torch = lazy_import("torch", extra="export")
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def bn_adapt(model: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """BatchNorm normalises with each test batch's statistics (Schneider et al., 2020); no gradients."""
    torch = lazy_import("torch", extra="export")
    mean, std = mean_std(model)
    model = _batch_stats(model)
    with torch.no_grad():
        return np.concatenate([model(to_tensor(images[i : i + batch], mean, std)).argmax(1).numpy()
                               for i in range(0, len(images), batch)])


def tent(model: Any, images: np.ndarray, batch: int = 64, lr: float = TENT_LR) -> np.ndarray:
    """Tent: batch statistics plus one entropy-minimisation step per batch on the BN affine parameters;
    the prediction is the forward pass's output (as in Tent's ``forward_and_adapt``)."""
    torch = lazy_import("torch", extra="export")
    mean, std = mean_std(model)
    model = _batch_stats(model)
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.requires_grad_(True)
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    preds = []
    for i in range(0, len(images), batch):
        logits = model(to_tensor(images[i : i + batch], mean, std))
        logp = logits.log_softmax(1)
        loss = -(logp.exp() * logp).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        preds.append(logits.argmax(1).detach().numpy())
    return np.concatenate(preds)
