"""condense: dataset distillation (condensation) toolkit.

    import condense
    result = condense.distil(method="dm", dataset="fashion_mnist", ipc=10, budget="cpu")
    report = condense.evaluate(result.run_dir)

:func:`distil` and :func:`evaluate` live in :mod:`condense.api` (imported on first use, so that
``import condense`` stays light).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["DistilResult", "distil", "evaluate", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("distil", "evaluate", "DistilResult"):
        from condense import api

        return getattr(api, name)
    raise AttributeError(f"module 'condense' has no attribute {name!r}")
