"""VC's affine pose (``--pose affine``): the warp and its inverse, the ELBO with the pose site
against a hand-written one, prediction from the canonical image, options, and a resumable run."""


import numpy as np
import pyro
import pytest
import torch
from helpers import (
    SHAPE,
    assert_same_gradients,
    explicit_component_log_density,
    interrupted_and_uninterrupted,
    small_fitted,
)
from ppl_cluster.models.vc import POSE_SCALE, affine, invert_affine, warp
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.nn import functional as F

from ppl_cluster import Clusterer
from ppl_cluster.cli import main
from ppl_cluster.config import FitConfig
from ppl_cluster.errors import ConfigError
from ppl_cluster.registry import get_variant

K, D = 4, 3
SMALL = dict(hidden=[64, 64], latent_dim=5, batch_size=64, lr=2e-3)


def posed(**extra):
    f = small_fitted("vc", K, D, pose="affine", **extra)
    with torch.no_grad():  # away from the identity it starts at
        f.guide.pose_net[-1].weight.normal_(0, 0.05)
        f.guide.pose_net[-1].bias.normal_(0, 0.5)
    return f


def test_warp_identity_shift_and_inverse():
    x = torch.rand(5, 1, 8, 8)
    flat = x.flatten(1)
    assert torch.allclose(warp(flat, affine(torch.zeros(5, 6)), (1, 8, 8)), flat, atol=1e-6)
    # b_x = 2 pixels (the grid spans [-1, 1] over 8 pixels): out(i, j) = x(i, j + 2).
    a = torch.zeros(1, 6)
    a[0, 2] = 2 * (2 / 8) / POSE_SCALE
    moved = warp(flat[:1], affine(a), (1, 8, 8)).reshape(8, 8)
    assert torch.allclose(moved[:, :6], x[0, 0, :, 2:], atol=1e-6)
    assert torch.all(moved[:, 6:] == 0)  # zeros came in from outside the frame
    theta = affine(torch.randn(7, 6))
    composed = torch.cat([theta, torch.tensor([[[0.0, 0, 1]]]).expand(7, 1, 3)], 1)
    back = torch.cat([invert_affine(theta), torch.tensor([[[0.0, 0, 1]]]).expand(7, 1, 3)], 1)
    torch.testing.assert_close(composed @ back, torch.eye(3).expand(7, 3, 3), atol=1e-5, rtol=0)
    # Broadcasting: K decoder outputs per image share the image's pose.
    assert warp(torch.rand(K, 5, 64), theta[:5], (1, 8, 8)).shape == (K, 5, 64)


def hand_written_posed_elbo(model, guide, x, eps_a, eps):
    """log N(a; 0, I) - log q(a|x) + sum_c q(c|x~)[log p(x|z_c, a) + log p(z_c|c) + log pi_c
    - log q(z_c|x~,c) - log q(c|x~)], with a = loc_a + scale_a eps_a, x~ = x moved by A(a)^-1
    and p(x|z, a) the decoder's logits moved by A(a), written with torch's grid functions."""
    n = x.shape[0]
    loc_a, log_var_a = guide.pose_net(x).chunk(2, -1)
    scale_a = (0.5 * log_var_a).exp()
    a = loc_a + scale_a * eps_a
    theta = torch.eye(2, 3) + POSE_SCALE * a.reshape(n, 2, 3)
    inverse = torch.linalg.inv(torch.cat([theta, torch.tensor([[[0.0, 0, 1]]]).expand(n, 1, 3)], 1))
    canonical = F.grid_sample(x, F.affine_grid(inverse[:, :2], list(x.shape), align_corners=False),
                              align_corners=False)
    h = guide.trunk(canonical)
    logits = guide.logits_head(h)
    loc = guide.loc_head(h).reshape(n, K, D).transpose(0, 1)
    scale = (0.5 * guide.log_var_head(h)).exp().reshape(n, K, D).transpose(0, 1)
    z = loc + scale * eps  # (K, N, D)
    out = model.decoder(z).reshape(K * n, *SHAPE)
    grid = F.affine_grid(theta.repeat(K, 1, 1), [K * n, *SHAPE], align_corners=False)
    out = F.grid_sample(out, grid, align_corners=False, padding_mode="border").reshape(K, n, -1)
    pixels = x.flatten(1)
    log_px = (pixels * out - F.softplus(out)).sum(-1)
    # (K, N): the components' log-density at each cluster's own z_c (full or diagonal).
    log_pz = torch.stack([explicit_component_log_density(model, z[c])[:, c] for c in range(K)])
    log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    log_pi = torch.log_softmax(model.pi_logits, -1)[:, None]
    log_qc = torch.log_softmax(logits, -1).T
    pose_terms = (torch.distributions.Normal(0.0, 1.0).log_prob(a).sum(-1)
                  - torch.distributions.Normal(loc_a, scale_a).log_prob(a).sum(-1))
    return (log_qc.exp() * (log_px + log_pz - log_qz + log_pi - log_qc)).sum() + pose_terms.sum()


@pytest.mark.parametrize("covariance", ["diag", "full"])  # full: VC's MNIST default
def test_posed_elbo_equals_hand_written_sum_with_gradients(covariance):
    f = posed(prior_covariance=covariance)
    assert (getattr(f.model, "tril", None) is not None) == (covariance == "full")
    x = torch.rand(8, *SHAPE).round()
    params = [p for m in (f.model, f.guide) for p in m.parameters()]
    tracer = poutine.trace(f.guide)  # records the pose and the z per cluster the ELBO used
    pyro.set_rng_seed(1)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(f.model, tracer, x)
    tr = tracer.msngr.trace
    assert tr.nodes["pose"]["value"].shape == (8, 6)  # one pose per image, not per cluster
    noise = {site: ((tr.nodes[site]["value"] - tr.nodes[site]["fn"].base_dist.loc)
                    / tr.nodes[site]["fn"].base_dist.scale).detach() for site in ("pose", "z")}
    ref = -hand_written_posed_elbo(f.model, f.guide, x, noise["pose"], noise["z"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert all(r is not None for r in ref_grads)  # the pose network's parameters included
    assert_same_gradients(torch.autograd.grad(loss, params, allow_unused=True), ref_grads)


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")
def test_prediction_reads_the_image_in_its_mean_pose():
    f = posed()
    x = torch.rand(6, *SHAPE)
    loc_a = f.guide.pose_posterior(x)[0]
    canonical = f.guide.canonical(x)
    assert not torch.allclose(canonical, x)
    expected = torch.log_softmax(f.guide.logits_head(f.guide.trunk(canonical)), -1)
    torch.testing.assert_close(f.variant.cluster_logits(f.model, f.guide, x), expected)
    torch.testing.assert_close(canonical, f.guide.canonical(x, loc_a))
    assert f.model.generate(5, cluster=1).shape == (5, *SHAPE)
    relaxed = posed(discrete="relaxed")
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(relaxed.model, relaxed.guide, x)
    assert torch.isfinite(loss)


def test_pose_options_are_checked(tmp_path, capsys):
    with pytest.raises(ConfigError, match="pose must be none or affine"):
        Clusterer("vc", 3, pose="rigid")
    with pytest.raises(ConfigError, match="needs the bernoulli likelihood"):
        Clusterer("vc", 3, pose="affine", likelihood="gaussian")
    with pytest.raises(ConfigError, match="not images"):
        Clusterer("vc", 3, pose="affine", epochs=1).fit(np.random.rand(20, 4))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "vc", "--pose", "rigid", "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2


def test_posed_run_trains_and_resumes_exactly(digits, tmp_path):
    cfg = get_variant("vc").resolve(FitConfig(model="vc", n_clusters=4, extra={"pose": "affine"}, **{**SMALL, "epochs": 3}
                    ))
    full, resumed = interrupted_and_uninterrupted(cfg, digits.x[:200], 0, 1, tmp_path)
    assert full.history["train"][-1] < full.history["train"][0]
    assert full.guide.pose_net[-1].weight.abs().sum() > 0  # the poses were learned
    for a, b in zip(full.guide.parameters(), resumed.guide.parameters(), strict=True):
        assert torch.equal(a, b)
