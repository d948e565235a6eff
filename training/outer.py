"""DiLoCo's pure part: outer parameters, the outer optimizer, pseudo-gradients, the state layout.

No communication happens here; :mod:`training.diloco` moves the bytes and this module does the
arithmetic, so the same code runs in the networked trainer and in the in-process simulation.

Outer round (DiLoCo, Douillard et al. 2023), for local parameters ``θ_local`` after H inner steps::

    Δ = θ_outer − θ_local                 pseudo_gradient()
    Δ̄ = mean of Δ over the peers           (the all-reduce, elsewhere)
    θ_outer ← OuterOpt(θ_outer, grad=Δ̄)    step()        default SGD(lr 0.7, momentum 0.9, Nesterov)
    θ_local ← θ_outer                      copy_to()

Determinism: the outer step is element-wise torch arithmetic on CPU tensors; given bit-identical
``θ_outer``, optimizer state and ``Δ̄`` (the all-reduce guarantees the latter), every peer computes
bit-identical results, whatever its thread count.

State layout: torch optimizers create their state (momentum buffers, Adam moments) lazily at the
first step, but a shared state must have the same keys on every peer from the very first sync (a
newcomer may join before any outer step). :func:`materialize_optimizer_state` therefore runs one
zero-gradient step at construction and undoes its effects: parameters are restored bit for bit
and every state tensor (``step`` counters included) is set to 0. For SGD (dampening 0), Adam and
AdamW the optimizer then behaves exactly like a fresh one (a zero momentum buffer times β plus g
is g; Adam's moments are zero and its bias correction restarts from step 0).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "ROUND_KEY",
    "OptimizerFactory",
    "OuterState",
    "default_outer_optimizer",
    "has_momentum",
    "materialize_optimizer_state",
]

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

ROUND_KEY = "diloco/round"
_PARAM_PREFIX = "outer/"
_OPT_PREFIX = "outer_opt/"


def default_outer_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: SGD, lr 0.7, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any parameter group carries momentum (SGD ``momentum`` or Adam's ``betas[0]``)."""
    for group in optimizer.param_groups:
        if float(group.get("momentum", 0.0) or 0.0) > 0.0:
            return True
        betas = group.get("betas")
        if betas is not None and float(betas[0]) > 0.0:
            return True
    return False


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's lazy state now, leaving parameters and behaviour unchanged.

    See the module docstring for why and for which optimizers the result equals a fresh
    optimizer. Gradients present before the call are restored too.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with torch.no_grad():
        for p, s, g in zip(params, saved, grads):
            p.copy_(s)
            p.grad = g
    # Zero every state tensor: the zero-gradient step may still have written weight decay
    # into a momentum buffer (SGD's decay is added to the gradient).
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif key == "step":
                state[key] = 0


def _names(named: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    return names


class OuterState:
    """The outer copy of the parameters, its optimizer, and the round counter.

    ``named_params`` are the local model's ``(name, parameter)`` pairs (``model.named_parameters()``);
    the outer copies are contiguous CPU float tensors with the same values. ``optimizer`` builds the
    outer optimizer from the list of outer tensors (default :func:`default_outer_optimizer`).

    Raises ``ValueError`` for duplicate names, no parameters, or a non-floating-point parameter.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.Tensor]],
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        named = list(named_params)
        if not named:
            raise ValueError("the model has no parameters")
        self.names = _names(named)
        for name, p in named:
            if not p.dtype.is_floating_point:
                raise ValueError(f"parameter {name!r} has dtype {p.dtype}; DiLoCo needs floating point")
        self.params = [p.detach().to("cpu", copy=True).contiguous() for _, p in named]
        factory = optimizer if optimizer is not None else default_outer_optimizer
        self.optimizer = factory(self.params)
        materialize_optimizer_state(self.optimizer)
        self.round = torch.zeros(1, dtype=torch.int64)  # outer rounds begun; a tensor so it can be synced

    # ------------------------------------------------------------------ arithmetic

    @torch.no_grad()
    def pseudo_gradient(
        self, local: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``Δ = θ_outer − θ_local`` per parameter, written into ``out`` when given (CPU tensors)."""
        if len(local) != len(self.params):
            raise ValueError(f"expected {len(self.params)} local tensors, got {len(local)}")
        if out is None:
            out = [torch.empty_like(p) for p in self.params]
        for o, p, l in zip(out, self.params, local):
            torch.sub(p, l.detach().to("cpu"), out=o)
        return list(out)

    def step(self, mean_delta: Sequence[torch.Tensor]) -> None:
        """Apply the outer optimizer with ``mean_delta`` as the gradient of ``θ_outer``."""
        if len(mean_delta) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors, got {len(mean_delta)}")
        for p, d in zip(self.params, mean_delta):
            p.grad = d
        self.optimizer.step()
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def copy_to(self, local: Sequence[torch.Tensor]) -> None:
        """``θ_local ← θ_outer`` in place (the local tensors keep their identity and device)."""
        for l, p in zip(local, self.params):
            l.copy_(p)

    # ------------------------------------------------------------------ state layout

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """The outer optimizer's tensor state, keyed ``outer_opt/<param name>/<state key>``."""
        out: dict[str, torch.Tensor] = {}
        for name, p in zip(self.names, self.params):
            for key, value in sorted(self.optimizer.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor):
                    out[f"{_OPT_PREFIX}{name}/{key}"] = value
        return out

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Everything peers must agree on, by key: outer parameters, optimizer state, round counter.

        The tensors are the live ones (a sync writes into them in place).
        """
        out = {f"{_PARAM_PREFIX}{n}": p for n, p in zip(self.names, self.params)}
        out.update(self.optimizer_tensors())
        out[ROUND_KEY] = self.round
        return out

    def state_dict(self) -> dict[str, object]:
        """A checkpoint of the outer state (copies)."""
        return {
            "params": {n: p.clone() for n, p in zip(self.names, self.params)},
            "optimizer": self.optimizer.state_dict(),
            "round": int(self.round.item()),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`'s output in place (tensors keep their identity).

        Raises ``ValueError`` if the parameter names or shapes differ.
        """
        params = state["params"]
        if not isinstance(params, Mapping) or sorted(params) != sorted(self.names):
            raise ValueError("checkpoint parameter names differ from the model's")
        for n, p in zip(self.names, self.params):
            src = params[n]
            if not isinstance(src, torch.Tensor) or src.shape != p.shape:
                raise ValueError(f"checkpoint parameter {n!r} has a different shape")
            p.copy_(src)
        live = self.optimizer_tensors()
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        # load_state_dict installs new state tensors; copy them into the previous ones and keep
        # those, so that a SharedState built on them stays valid.
        for name, p in zip(self.names, self.params):
            st = self.optimizer.state.get(p, {})
            for k, v in st.items():
                old = live.get(f"{_OPT_PREFIX}{name}/{k}")
                if isinstance(v, torch.Tensor) and old is not None and old.shape == v.shape and old.dtype == v.dtype:
                    old.copy_(v)
                    st[k] = old
        self.round.fill_(int(state["round"]))  # type: ignore[call-overload]
