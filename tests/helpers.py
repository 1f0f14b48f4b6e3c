"""Small builders shared by the tests (importable: pytest puts tests/ on sys.path)."""

import math

import pyro
import pytest
import torch

from ppl_cluster import checkpoint as ckpt
from ppl_cluster.config import FitConfig
from ppl_cluster.registry import get_variant
from ppl_cluster.train import Fitted, Trainer, build

SHAPE = (1, 6, 6)
# Every subprocess or process group a test starts ends within this many seconds, or it fails.
SUBPROCESS_TIMEOUT = 300


def small_fitted(model: str = "vade", k: int = 4, d: int = 3, likelihood: str = "bernoulli",
                 **extra) -> Fitted:
    """A tiny built variant with non-trivial prior parameters (seeded)."""
    cfg = get_variant(model).resolve(FitConfig(model=model, n_clusters=k, latent_dim=d, likelihood=likelihood,
                    hidden=[16, 8], extra=extra))
    pyro.set_rng_seed(0)
    fitted = build(cfg, SHAPE, torch.device("cpu"))
    with torch.no_grad():
        fitted.model.pi_logits.normal_()
        fitted.model.log_sigma.uniform_(-0.5, 0.5)
        if getattr(fitted.model, "tril", None) is not None:  # correlated components
            fitted.model.tril.normal_(0, 0.3)
    return fitted


def interrupted_and_uninterrupted(cfg: FitConfig, x: torch.Tensor, seed: int, stop_after: int,
                                  tmp_path) -> tuple[Fitted, Fitted]:
    """(uninterrupted run, run stopped after epoch ``stop_after`` and resumed from its
    checkpoint): exact resume means the two are equal."""
    full = Trainer(cfg, x, seed=seed, checkpoint_path=str(tmp_path / "full.pt"),
                   progress=False).run()

    def stop(epoch: int, loss: float) -> None:
        if epoch == stop_after:
            raise KeyboardInterrupt

    path = str(tmp_path / "part.pt")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, x, seed=seed, checkpoint_path=path, progress=False, on_epoch=stop).run()
    assert ckpt.load(path)["epoch"] == stop_after + 1
    return full, Trainer(cfg, x, seed=seed, checkpoint_path=path, progress=False).run(resume=True)


def assert_enumerated_loss_equals(fitted: Fitted, x: torch.Tensor, reference) -> None:
    """TraceEnum_ELBO's loss on one guide draw (seed 1) equals ``reference(guide_trace)``, a
    hand-written loss at the same latents, in value and in every parameter's gradient."""
    from pyro import poutine
    from pyro.infer import TraceEnum_ELBO

    pyro.set_rng_seed(1)
    guide_tr = poutine.trace(fitted.guide).get_trace(x)
    params = [p for m in (fitted.model, fitted.guide) for p in m.parameters()]
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        fitted.model, poutine.replay(fitted.guide, trace=guide_tr), x)
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    ref = reference(guide_tr)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_gradients(grads, ref_grads)


def assert_same_gradients(grads, ref_grads) -> None:
    """Gradients equal within float32 tolerance; a parameter the reference does not reach must
    get none (or zeros)."""
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def explicit_component_log_density(model, z: torch.Tensor) -> torch.Tensor:
    """log N(z; mu_c, Sigma_c) for every cluster, shape (N, K), from the formulas (sharing no code
    with the models): Sigma_c = L_c L_c^T, L_c = diag(exp(log_sigma_c)) + the strict lower
    triangle of tril_c (diagonal without tril), through solve and slogdet."""
    lower = torch.diag_embed(model.log_sigma.exp())
    if getattr(model, "tril", None) is not None:
        lower = lower + torch.tril(model.tril, diagonal=-1)
    cov = lower @ lower.transpose(-1, -2)  # (K, D, D)
    diff = (z[:, None, :] - model.mu).unsqueeze(-1)  # (N, K, D, 1)
    maha = (diff.transpose(-1, -2) @ torch.linalg.solve(cov, diff)).reshape(z.shape[0], -1)
    return -0.5 * (maha + torch.linalg.slogdet(cov)[1] + z.shape[-1] * math.log(2 * math.pi))


def variant_like(base, **attrs):
    """A variant derived from ``base`` with attributes replaced: hooks (and ``build``) as plain
    functions of (model, guide, ...) or (cfg, image_shape), None to remove a capability."""
    body = {k: staticmethod(v) if callable(v) and not isinstance(v, type) else v
            for k, v in attrs.items()}
    return type(f"Derived_{attrs.get('name', base.name)}", (type(base),), body)()


def applicable(model: str, settings: dict) -> dict:
    """``settings`` without the common ones of groups (pretraining, initialisation) that
    variant ``model`` does not use, which it would refuse."""
    variant = get_variant(model)
    return {k: v for k, v in settings.items() if variant.takes(k)}
