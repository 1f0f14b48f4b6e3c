"""Median milliseconds per training step: hand-written PyTorch VaDE vs our Pyro step, eager
and compiled.

    python benchmarks/step_time.py --device cpu --batch-sizes 256 1024 4096      # paper's nets
    OMP_NUM_THREADS=1 python benchmarks/step_time.py --hidden 64 --batch-sizes 64 256

(a) `torch`: the same networks and the same ELBO (logsumexp over clusters) written by hand,
    with `torch.optim.Adam(params, lr)` as a user would write it;
(a') `torch+fused`: the same, with the fused Adam our trainer uses: the difference to (b) is
    then Pyro's own cost (tracing, enumeration, contraction);
(a'') `torch+compiled`: (a') traced and compiled the way (c) is (`ppl_cluster.compiled`);
(b) `pyro`: our eager step, `TraceEnum_ELBO(model, guide)` as a module + the trainer's Adam
    (`train.make_adam`);
(c) `pyro+fx`, `pyro+compiled`: (b) traced once through Pyro into one ATen graph, replayed op
    by op (`fx`) or compiled by inductor (`compiled`, what `--compile on` runs).
All in one process, same device, same data, steps in alternation; ratios are to (a').
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from torch.nn import functional as F

from ppl_cluster.config import FitConfig
from ppl_cluster.registry import get_variant
from ppl_cluster.train import build, make_adam


def hand_written_loss(model, guide, x: torch.Tensor) -> torch.Tensor:
    loc, scale = guide.encoder(x)
    z = loc + scale * torch.randn_like(loc)
    logits = model.decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(-1)
    sigma = model.log_sigma.exp()
    log_pzc = (-0.5 * ((z[:, None] - model.mu) / sigma) ** 2 - model.log_sigma
               - 0.9189385332046727).sum(-1)
    log_pz = torch.logsumexp(torch.log_softmax(model.pi_logits, -1) + log_pzc, -1)
    log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.9189385332046727).sum(-1)
    return -(log_px + log_pz - log_qz).sum()


def time_steps(steps: dict, device: torch.device, n: int, warmup: int) -> dict[str, float]:
    """Median ms per step of each callable, run in alternation (step a, step b, a, b, ...) so
    that a change in the machine's load hits every path alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


PATHS = ("torch", "torch+fused", "torch+compiled", "pyro", "pyro+fx", "pyro+compiled")


def main() -> None:
    from ppl_cluster.compiled import CompiledStep

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="encoder widths (default the paper's 500 500 2000)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = get_variant("vade").resolve(FitConfig(dataset="mnist", hidden=args.hidden))
    print(f"device {device}, threads {torch.get_num_threads()}, VaDE nets 784-"
          f"{'-'.join(map(str, cfg.hidden))}-{cfg.latent_dim}, K={cfg.n_clusters}")
    print(f"{'batch':>6} " + " ".join(f"{name + ' ms':>17}" for name in PATHS)
          + " " + " ".join(f"{'/' + name:>15}" for name in PATHS[2:]) + f" {'compile s':>10}")
    for batch in args.batch_sizes:
        x = torch.rand(batch, 1, 28, 28, device=device).round()
        steps, compiled = {}, []
        for name in PATHS:
            pyro.set_rng_seed(0)
            fitted = build(cfg, (1, 28, 28), device)
            module = fitted.elbo_module()
            params = list(module.parameters())
            optim = (torch.optim.Adam(params, lr=1e-3) if name == "torch" else make_adam(params, 1e-3))
            loss_fn = (module if name.startswith("pyro")
                       else lambda xb, f=fitted: hand_written_loss(f.model, f.guide, xb))
            if name.endswith(("+fx", "+compiled")):
                step_fn = CompiledStep(loss_fn, [fitted.model, fitted.guide], scale=1.0 / batch,
                                       name=name, backend="fx" if name.endswith("fx") else "inductor",
                                       say=lambda text: None)
                compiled.append(step_fn)

                def step(step_fn=step_fn, optim=optim, x=x):
                    step_fn(x)
                    optim.step()
            else:
                def step(loss_fn=loss_fn, optim=optim, x=x, batch=batch):
                    loss = loss_fn(x) / batch
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    optim.step()

            steps[name] = step
        with pyro.validation_enabled(False):
            results = time_steps(steps, device, args.steps, args.warmup)
        ref = results["torch+fused"]
        print(f"{batch:>6} " + " ".join(f"{results[n]:17.2f}" for n in PATHS) + " "
              + " ".join(f"{results[n] / ref:15.2f}" for n in PATHS[2:])
              + f" {max(c.seconds for c in compiled):10.1f}", flush=True)


if __name__ == "__main__":
    main()
