"""Comparisons of parameter and gradient dictionaries."""
from __future__ import annotations

from torch import Tensor


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """The largest absolute difference over every entry of two dicts with the same keys."""
    assert a.keys() == b.keys(), f"different keys: {sorted(set(a) ^ set(b))}"
    return max(float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in a)   # float64 stays exact
