"""Training on pccl: DiLoCo (sync and async) and the tiny-GPT toolkit used to validate it.

``from training import DiLoCo`` is the user-facing entry point (see :mod:`training.diloco`).
The rest is the validation kit: :mod:`training.data` (standard-library character corpus),
:mod:`training.model` (tiny GPT), :mod:`training.baselines` (single-worker / DDP baselines,
warm start), :mod:`training.simulate` (in-process DiLoCo), :mod:`training.validate` (the
multi-process claims) and :mod:`training.demo` (``pccl demo``).

``DiLoCo`` and ``RoundInfo`` are imported on first use, so the data and model modules do not
pull in the networking stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.diloco import DiLoCo, RoundInfo
    from training.zo import ZerothOrder

__all__ = ["DiLoCo", "RoundInfo", "ZerothOrder"]


def __getattr__(name: str) -> Any:
    if name == "ZerothOrder":
        from training import zo

        return zo.ZerothOrder
    if name in __all__:
        from training import diloco

        return getattr(diloco, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
