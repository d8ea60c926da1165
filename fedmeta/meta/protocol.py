"""The few-shot evaluation's adaptation-rate grid, one constant for every caller.

Kept free of torch so the command line can show it as ``fedmeta evaluate``'s
default without importing the models.
"""

from __future__ import annotations

#: the adaptation rates scored on validation, per method and shot count (``fedmeta
#: evaluate``'s default and the few-shot benchmark's grid, 20 steps, cosine-decayed)
LR_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 0.5)


def grid_text(grid: tuple[float, ...] = LR_GRID) -> str:
    """The grid as the comma-separated option value (``0.01,0.03,...``)."""
    return ",".join(f"{x:g}" for x in grid)
