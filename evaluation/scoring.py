"""Per-model measurements: membership scores, per-sample gradient norms, batch influence.

Everything a model contributes to the analysis is computed here once, right after training,
and cached; the attacks and metrics then only read arrays.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from safenorm.evaluation.canaries import Universe
from safenorm.evaluation.config import EvalConfig
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "batch_query_measures",
    "eval_mode_grad_norms",
    "eval_mode_scores",
    "logit_confidence",
    "score_model",
    "train_mode_scores",
]


def logit_confidence(logits: Tensor, y: Tensor) -> Tensor:
    """``log(p_y / (1 - p_y))`` computed stably as ``z_y - logsumexp_{k != y} z_k``.

    The logit-scaled confidence of LiRA: approximately Gaussian across models, so means and a
    variance describe it. ``p_y = sigmoid(score)`` and the cross-entropy is ``softplus(-score)``.
    """
    z = logits.double()
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return zy - torch.logsumexp(others, dim=1)


@torch.no_grad()
def eval_mode_scores(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> np.ndarray:
    """Logit-scaled confidence of every example with the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        logit_confidence(model(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device))
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).cpu().numpy()


@contextmanager
def _train_mode_query(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Train mode for queries: buffers are restored afterwards and DP noise is reproducible."""
    state = copy.deepcopy(model.state_dict())
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield state
    finally:
        model.load_state_dict(state)
        model.train(was_training)


def train_mode_scores(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, seed: int
) -> np.ndarray:
    """Logit-scaled confidence with the model queried in TRAIN mode, in batches.

    A separate threat model: the adversary submits batches and sees outputs normalized with the
    batch's statistics (or, for DP layers, with released statistics). The batches are a fixed
    permutation of the examples (``seed``), so an example meets the same mates in every model.
    """
    device = next(model.parameters()).device
    perm = torch.from_numpy(np.random.default_rng([seed, 5]).permutation(len(x)))
    scores = torch.empty(len(x), dtype=torch.float64)
    with _train_mode_query(model) as state, torch.no_grad():
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm refuses one-sample batches: join it to the previous one
                idx = perm[max(0, i - batch_size + 1) : i + batch_size]
            model.load_state_dict(state)
            torch.manual_seed(seed + i)
            logits = model(x[idx].to(device))
            scores[idx] = logit_confidence(logits, y[idx].to(device)).cpu()
    return scores.numpy()


def eval_mode_grad_norms(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 256) -> np.ndarray:
    """L2 norm of each sample's loss gradient over all parameters (eval mode, exact, vmap)."""
    model.eval()
    device = next(model.parameters()).device
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    norms = []
    for i in range(0, len(x), chunk):
        g = per_sample(params, x[i : i + chunk].to(device), y[i : i + chunk].to(device))
        sq = sum(v.flatten(1).pow(2).sum(1) for v in g.values())
        norms.append(sq.sqrt().cpu())
    return torch.cat(norms).double().numpy()


def batch_query_measures(
    model: nn.Module,
    xq: Tensor,
    yq: Tensor,
    mates_x: Tensor,
    mates_y: Tensor,
    replacement: Tensor,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Train-mode gradient norm of each query, and its influence on its batch mates.

    Each query sample is appended to the same batch of typical mates and the model is run in
    train mode (the optimizer's view of one step):

    * ``grad_norm[i]``: norm of the gradient of sample i's own loss, through the batch
      statistics;
    * ``influence[i]``: mean L2 change of the mates' logits when sample i is swapped for a
      typical ``replacement`` sample; the influence it exerts through the batch statistics
      (exactly 0 for layers that do not couple samples).

    DP noise is drawn identically for the two forwards, so only the sample's effect is measured.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    mates_x, mates_y = mates_x.to(device), mates_y.to(device)
    rep = replacement.to(device)[None]
    grad_norms = np.empty(len(xq))
    influence = np.empty(len(xq))
    with _train_mode_query(model) as state:
        for i in range(len(xq)):
            xi = xq[i : i + 1].to(device)
            model.load_state_dict(state)
            torch.manual_seed(seed)
            out = model(torch.cat([mates_x, xi]))
            loss = F.cross_entropy(out[-1:], yq[i : i + 1].to(device))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grad_norms[i] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
            with torch.no_grad():
                model.load_state_dict(state)
                torch.manual_seed(seed)
                out_rep = model(torch.cat([mates_x, rep]))
                diff = (out[:-1].detach() - out_rep[:-1]).norm(dim=1)
                influence[i] = float(diff.mean())
    return grad_norms, influence


def grad_query_indices(universe: Universe, config: EvalConfig) -> np.ndarray:
    """Universe indices measured for gradients: typical pool examples, then every canary."""
    pool = universe.indices("pool")
    rng = np.random.default_rng([config.seed, 3])
    typical = np.sort(rng.choice(pool, min(config.analysis.grad_typical, len(pool)), replace=False))
    return np.concatenate([typical, universe.indices("canary")])


def score_model(
    model: nn.Module, universe: Universe, config: EvalConfig, model_index: int
) -> dict[str, np.ndarray]:
    """All per-model arrays the analysis needs (see :mod:`safenorm.evaluation.harness`)."""
    x, y = universe.x, universe.y
    result: dict[str, np.ndarray] = {"score_eval": eval_mode_scores(model, x, y)}
    test = universe.indices("test")
    with torch.no_grad():
        device = next(model.parameters()).device
        pred = model.eval()(x[test].to(device)).argmax(1).cpu()
    result["test_acc"] = np.array(float((pred == y[test]).double().mean()))
    if config.attacks.train_mode_queries:
        result["score_train"] = train_mode_scores(
            model, x, y, config.analysis.batch_mates, config.seed
        )
    if model_index < config.analysis.grad_models:
        idx = grad_query_indices(universe, config)
        mates = test[: config.analysis.batch_mates - 1]
        replacement = x[test[config.analysis.batch_mates - 1]]
        result["grad_index"] = idx
        result["grad_norm_eval"] = eval_mode_grad_norms(model, x[idx], y[idx])
        gn, infl = batch_query_measures(
            model, x[idx], y[idx], x[mates], y[mates], replacement, config.seed
        )
        result["grad_norm_train"] = gn
        result["influence"] = infl
    return result
