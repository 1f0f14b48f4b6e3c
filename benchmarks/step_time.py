"""Median milliseconds per training step: hand-written PyTorch VaDE vs our Pyro step.

    python benchmarks/step_time.py --device cpu --batch-sizes 256 1024 4096

(a) `torch`: the same networks and the same ELBO (logsumexp over clusters) written by hand,
    with `torch.optim.Adam(params, lr)` as a user would write it;
(a') `torch+fused`: the same, with the fused Adam our trainer uses: the difference to (b) is
    then Pyro's own cost (tracing, enumeration, contraction);
(b) `pyro`: our default step, `TraceEnum_ELBO(model, guide)` as a module + the trainer's Adam
    (`train.make_adam`). All in one process, same device, same data, steps in alternation;
    ratios = (b) / (a) and (b) / (a').
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = get_variant("vade").resolve(FitConfig(dataset="mnist"))
    print(f"device {device}, threads {torch.get_num_threads()}, VaDE nets 784-{'-'.join(map(str, cfg.hidden))}-{cfg.latent_dim}, K={cfg.n_clusters}")
    print(f"{'batch':>6} {'torch ms':>9} {'fused ms':>9} {'pyro ms':>9} {'/torch':>7} {'/fused':>7} "
          f"{'peak MiB':>9}")
    for batch in args.batch_sizes:
        x = torch.rand(batch, 1, 28, 28, device=device).round()
        steps = {}
        for name in ("torch", "torch+fused", "pyro"):
            pyro.set_rng_seed(0)
            fitted = build(cfg, (1, 28, 28), device)
            module = fitted.elbo_module()
            params = list(module.parameters())
            optim = (torch.optim.Adam(params, lr=1e-3) if name == "torch" else make_adam(params, 1e-3))
            loss_fn = (module if name == "pyro"
                       else lambda xb, f=fitted: hand_written_loss(f.model, f.guide, xb))

            def step(loss_fn=loss_fn, optim=optim, x=x, batch=batch):
                loss = loss_fn(x) / batch
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()

            steps[name] = step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with pyro.validation_enabled(False):
            results = time_steps(steps, device, args.steps, args.warmup)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        print(f"{batch:>6} {results['torch']:9.2f} {results['torch+fused']:9.2f} "
              f"{results['pyro']:9.2f} {results['pyro'] / results['torch']:7.2f} "
              f"{results['pyro'] / results['torch+fused']:7.2f} {peak:9.0f}")

if __name__ == "__main__":
    main()
