"""The compiled step (ppl_cluster.compiled): the same loss and gradients as eager
TraceEnum_ELBO for the same parameters and draws, the same fit, exact resume, and the eager
fallbacks, each said."""

import pyro
import pytest
import torch
from helpers import interrupted_and_uninterrupted

from ppl_cluster.cli import main
from ppl_cluster.compiled import AUTO_STEPS, AUTO_WORK, CompiledStep, reason_not_to
from ppl_cluster.config import FitConfig
from ppl_cluster.registry import all_variants, get_variant
from ppl_cluster.train import Trainer, build

SHAPE = (1, 8, 8)
# Tolerances: the traced graph replayed op by op (fx) runs the very ATen ops eager runs, so it
# is exact; inductor fuses them and sums in another order.
EXACT, FUSED = 0.0, 1e-5


def _built(name: str):
    extra = dict(clusters_per_facet=[3, 2]) if name == "mfcvae" else {}
    cfg = get_variant(name).resolve(FitConfig(model=name, n_clusters=3, hidden=[16], latent_dim=2,
                                              epochs=2, batch_size=16, init="gmm", gmm_inits=1,
                                              extra=extra))
    pyro.set_rng_seed(0)
    fitted = build(cfg, SHAPE, torch.device("cpu"))
    with torch.no_grad():  # away from the initial symmetric state
        for p in fitted.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return fitted


def _x(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).round()


def _eager(fitted, x, params):
    module = fitted.elbo_module()
    loss = module(x) / x.shape[0]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), grads


@pytest.mark.parametrize("name", sorted(all_variants()))
def test_traced_loss_and_gradients_equal_eager_ones(name):
    fitted = _built(name)
    x = _x()
    if fitted.variant.e_step is not None:
        # CGM's guide finds each image's Langevin chain by the image's content: a graph fixed
        # to one batch would hand the next batch the first one's chains. It runs eagerly.
        assert "E-step" in reason_not_to("on", steps=10**6, work=1, e_step=True,
                                         distributed=False)
        return
    params = [p for m in (fitted.model, fitted.guide) for p in m.parameters() if p.requires_grad]
    backends = ("fx", "inductor") if name in ("vade", "mfcvae") else ("fx",)
    for backend in backends:
        step = CompiledStep(fitted.elbo_module(), [fitted.model, fitted.guide],
                            scale=1.0 / x.shape[0], name=name, backend=backend,
                            say=lambda text: None)
        with pyro.validation_enabled(False):
            for seed in (1, 2):  # the first call traces (and compiles), the second replays
                torch.manual_seed(seed)
                ref_loss, ref_grads = _eager(fitted, x, params)
                torch.manual_seed(seed)
                loss = step(x)
                tol = EXACT if step.backend == "fx" else FUSED
                assert torch.allclose(loss, ref_loss, rtol=tol, atol=tol), (backend, loss, ref_loss)
                for p, g in zip(params, ref_grads, strict=True):
                    if g is None:
                        assert p.grad is None
                    else:
                        assert p.grad.stride() == p.stride()
                        assert torch.allclose(p.grad, g, rtol=tol, atol=tol * max(1.0, g.abs().max().item()))
        assert step.traces == 1 and step.eager_reason is None


def test_another_batch_shape_runs_eagerly_and_says_so():
    fitted = _built("vade")
    said = []
    step = CompiledStep(fitted.elbo_module(), [fitted.model, fitted.guide], scale=1.0 / 16,
                        name="vade SVI", backend="fx", say=said.append)
    with pyro.validation_enabled(False):
        step(_x(16))
        partial = _x(5)
        torch.manual_seed(3)
        ref = fitted.elbo_module()(partial) / 16
        torch.manual_seed(3)
        loss = step(partial)
    assert torch.equal(loss, ref.detach())
    assert any("(5, 1, 8, 8)" in line and "eagerly" in line for line in said), said


def test_a_changed_python_value_retraces_and_too_many_changes_fall_back():
    fitted = _built("vade")
    said = []
    step = CompiledStep(fitted.elbo_module(), [fitted.model, fitted.guide], scale=1.0 / 16,
                        name="vade SVI", backend="fx", say=said.append)
    x = _x()
    with pyro.validation_enabled(False):
        step(x)
        step.refresh()
        assert step.graph is not None  # nothing changed
        for value in range(1, 6):
            fitted.model.schedule_value = float(value)  # what an on_epoch hook would set
            step.refresh()
            step(x)
    assert step.traces == 4 and step.eager_reason is not None
    assert any("runs eagerly from here" in line for line in said)


def test_auto_compiles_long_overhead_bound_phases_of_stateless_variants_only():
    small = dict(work=AUTO_WORK, e_step=False, distributed=False)
    assert reason_not_to("auto", steps=AUTO_STEPS, **small) is None
    assert "too few" in reason_not_to("auto", steps=AUTO_STEPS - 1, **small)
    assert "outweighs" in reason_not_to("auto", steps=AUTO_STEPS, work=AUTO_WORK + 1,
                                        e_step=False, distributed=False)
    assert reason_not_to("on", steps=10, work=10**12, e_step=False, distributed=False) is None
    assert "E-step" in reason_not_to("on", steps=10**6, work=1, e_step=True, distributed=False)
    assert "data-parallel" in reason_not_to("on", steps=10**6, work=1, e_step=False,
                                            distributed=True)
    assert reason_not_to("off", steps=10**6, **small) == "compile is off"


def _cfg(compile_: str) -> FitConfig:
    return get_variant("vade").resolve(FitConfig(
        n_clusters=4, hidden=[32], latent_dim=3, epochs=3, pretrain_epochs=2, batch_size=128,
        init="gmm", gmm_inits=1, compile=compile_))


def test_a_compiled_fit_ends_where_an_eager_one_does(digits):
    x = digits.x[:640]
    eager = Trainer(_cfg("off"), x, seed=0, progress=False).run()
    compiled = Trainer(_cfg("on"), x, seed=0, progress=False).run()
    for part in ("model", "guide"):
        a, b = getattr(eager, part).state_dict(), getattr(compiled, part).state_dict()
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-4), name
    for phase in ("pretrain", "train"):
        assert compiled.history[phase] == pytest.approx(eager.history[phase], rel=1e-5)


def test_resume_is_exact_in_compiled_mode(digits, tmp_path):
    full, resumed = interrupted_and_uninterrupted(_cfg("on"), digits.x[:640], 0, 2, tmp_path)
    for part in ("model", "guide"):
        a, b = getattr(full, part).state_dict(), getattr(resumed, part).state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert full.history == resumed.history


def test_compile_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's choices
        main(["fit", "--compile", "maybe", "--out", str(tmp_path / "r")])
    assert stop.value.code == 2 and "--compile" in capsys.readouterr().err
    assert main(["fit", "--model", "cgm", "--compile", "on", "--epochs", "1", "--hidden", "32",
                 "--latent-dim", "3", "--init", "gmm", "--out", str(tmp_path / "cgm"),
                 "--quiet"]) == 0
    assert "runs eagerly (the variant updates per-image state" in capsys.readouterr().err
