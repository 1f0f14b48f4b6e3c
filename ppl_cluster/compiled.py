"""A training step traced once through Pyro and compiled: the loss and every gradient as one
static graph for a fixed batch shape.

Pyro builds ``TraceEnum_ELBO`` anew on every step in Python (messengers, enumeration, the
contraction plan); for small networks that costs more than the arithmetic. Here the step is
run once under ``make_fx``, which records only the tensor operations it executes, forward and
backward (``torch.autograd.grad``), into an FX graph of ATen ops; ``torch.compile`` (inductor)
then fuses it. The model and guide stay ordinary Pyro programs and ``TraceEnum_ELBO`` still
defines the loss: the graph *is* its computation, with three things fixed at trace time:

- the batch shape (another shape runs eagerly, said once);
- Python values the programs read (schedules such as a temperature, flags): :meth:`refresh`
  compares them, and the identities of every parameter and tensor attribute, once per epoch
  and traces again when they changed;
- data-dependent branches inside Pyro (e.g. whether any enumerated probability underflowed
  to 0, ``pyro.infer.util.compute_expectation``) take the path of the traced batch.

Random draws are the same as eager ones (the graph calls the same RNG ops in the same order,
``fallback_random``), so compiled losses and gradients equal eager ones to float rounding.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

MAX_TRACES = 4  # beyond this many re-traces in one phase a step runs eagerly (said once)
# ``auto`` compiles a phase only where the step is measured to be bound by Pyro's per-step
# overhead and the phase repays the 4-30 s of tracing and compiling (docs/engineering.md):
# nets 784-64-10 at batch 64-256 (batch x parameters <= 3e7) ran in 0.66-0.68x the eager time,
# 2.9-4 ms saved per step; at the paper's nets the fused kernels gained 6-12 % per step but a
# whole default MNIST fit did not repay its compile (vade 205 -> 214 s) or ran slower (vc
# with its affine pose, 670 -> 781 s).
AUTO_STEPS = 3000
AUTO_WORK = 30_000_000  # batch x trainable parameters


def reason_not_to(setting: str, *, steps: int, work: int, e_step: bool,
                  distributed: bool) -> str | None:
    """Why a phase of ``steps`` optimisation steps of ``work`` (batch x parameters) each runs
    eagerly under ``compile=setting`` (None: it is compiled). "on" says the reason, "auto" not."""
    if setting == "off":
        return "compile is off"
    if e_step:
        return "the variant updates per-image state between steps (an E-step)"
    if distributed:
        return "data-parallel training runs eagerly"
    if setting == "auto" and steps < AUTO_STEPS:
        return f"{steps} steps are too few to repay compiling (auto compiles >= {AUTO_STEPS})"
    if setting == "auto" and work > AUTO_WORK:
        return (f"the step's arithmetic (batch x parameters {work:.2g}) outweighs Pyro's "
                f"overhead (auto compiles <= {AUTO_WORK:.0e})")
    return None


def _fingerprint(modules: list[torch.nn.Module]) -> tuple:
    """What a traced graph has baked in: every module's Python scalars by value, and its
    parameters, buffers and tensor attributes by identity."""
    items: list[Any] = []
    for root in modules:
        for name, m in root.named_modules():
            for key, value in vars(m).items():
                if isinstance(value, bool | int | float | str) or value is None:
                    items.append((name, key, value))
                elif isinstance(value, torch.Tensor):
                    items.append((name, key, id(value)))
            items += [(name, k, id(v)) for k, v in m._parameters.items()]
            items += [(name, k, id(v)) for k, v in m._buffers.items()]
    return tuple(items)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class CompiledStep:
    """``loss_fn(x) * scale`` and the gradient of every parameter of ``modules`` (set as their
    ``.grad``, as ``backward`` would), from a graph traced on the first batch.

    ``backend``: "inductor" (fused kernels; falls back to "fx" if it cannot compile) or "fx"
    (the traced graph replayed op by op, no compiler needed). ``name`` labels the one-line
    messages (compile time, fallbacks) written to ``say`` (stderr by default).
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 modules: list[torch.nn.Module], *, scale: float, name: str,
                 backend: str = "inductor", say: Callable[[str], None] | None = None) -> None:
        self.loss_fn, self.modules, self.scale, self.name = loss_fn, modules, scale, name
        self.backend = backend
        self.say = say or (lambda text: print(f"ppl-cluster: {text}", file=sys.stderr))
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.graph: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        self.shape: tuple[Any, ...] | None = None
        self.used: list[bool] = []  # which parameters the loss reaches (the rest keep grad None)
        self.key: tuple = ()
        self.traces = 0
        self.eager_reason: str | None = None
        self.told: set[str] = set()
        self.seconds = 0.0  # tracing and compiling, all traces

    def refresh(self) -> None:
        """Drop the graph if what it baked in has changed (call between epochs)."""
        if self.graph is not None and _fingerprint(self.modules) != self.key:
            self.graph = None

    def _tell(self, text: str) -> None:
        if text not in self.told:
            self.told.add(text)
            self.say(text)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(x) * self.scale
        for m in self.modules:
            m.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    def _trace(self, x: torch.Tensor) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        # Anew: a hook may have replaced a parameter (the fingerprint then changed).
        self.params = params = [p for m in self.modules for p in m.parameters() if p.requires_grad]

        def step(xb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            loss = self.loss_fn(xb) * self.scale
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            self.used = [g is not None for g in grads]
            return (loss.detach(), *[g for g in grads if g is not None])

        t0 = time.perf_counter()
        rng = _rng_state(x.device)  # tracing runs the step once: its draws must not count
        try:
            # Pyro's data-dependent branches take the traced batch's path (module docstring).
            graph = make_fx(step, _error_on_data_dependent_ops=False)(x)
        finally:
            _set_rng_state(rng, x.device)
        graph.graph.eliminate_dead_code()
        graph.recompile()
        run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = graph
        if self.backend == "inductor":
            import torch._inductor.config as inductor

            compiled = torch.compile(graph, backend="inductor", fullgraph=True, dynamic=False)
            quiet = logging.getLogger("torch.utils.cpp_extension")  # "no CUDA runtime" on CPU
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                # Eager's RNG ops, so eager's draws; no_grad: the graph holds its own backward.
                with inductor.patch(fallback_random=True), torch.no_grad(), \
                        warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=FutureWarning)  # inductor's own
                    compiled(x.clone())  # compiles; its draws are undone below
            except Exception as exc:  # no C++ compiler, an unsupported op, ...
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
                self._tell(f"{self.name}: inductor could not compile the step ({first}); "
                           "replaying the traced graph instead")
                self.backend = "fx"
            else:
                run = compiled
            finally:
                quiet.setLevel(level)
                _set_rng_state(rng, x.device)
        self.graph, self.shape = run, (tuple(x.shape), x.dtype, x.device)
        self.key = _fingerprint(self.modules)
        self.traces += 1
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self._tell(f"{self.name}: step traced and compiled ({self.backend}) in {seconds:.1f} s"
                   + (f" (trace {self.traces})" if self.traces > 1 else ""))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.eager_reason is not None:
            return self._eager(x)
        if self.graph is not None and (tuple(x.shape), x.dtype, x.device) != self.shape:
            self._tell(f"{self.name}: a batch of shape {tuple(x.shape)} is not the compiled "
                       f"{self.shape[0] if self.shape else ''}: it runs eagerly")
            return self._eager(x)
        if self.graph is None:
            if self.traces >= MAX_TRACES:
                self.eager_reason = (f"{self.name}: the model changed {self.traces} times "
                                     "(e.g. a schedule): the step runs eagerly from here")
                self._tell(self.eager_reason)
                return self._eager(x)
            try:
                self._trace(x)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                self.eager_reason = f"{self.name}: the step could not be traced ({first}); it runs eagerly"
                self._tell(self.eager_reason)
                return self._eager(x)
        with torch.no_grad():  # the graph computes the gradients itself
            out = self.graph(x)  # type: ignore[misc]
        grads = iter(out[1:])
        for p, used in zip(self.params, self.used, strict=True):
            if not used:
                p.grad = None
                continue
            g = next(grads)
            # backward gives each .grad its parameter's strides (fused Adam relies on it).
            p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        return out[0]
