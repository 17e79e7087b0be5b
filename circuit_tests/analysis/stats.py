"""Uncertainty: percentile bootstrap intervals over held-out examples, with a seed of their own."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Interval = tuple[float, float]


def bootstrap(
    statistic: Callable[..., torch.Tensor | float],
    samples: Sequence[torch.Tensor], n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """A percentile confidence interval for ``statistic(*samples)``, resampling examples (the last dim) with ``seed``."""
    n = samples[0].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (n_resamples, n), generator=generator)
    values = torch.tensor([float(statistic(*(s[..., rows] for s in samples))) for rows in draws])
    tail = (1 - level) / 2
    return float(values.quantile(tail)), float(values.quantile(1 - tail))
