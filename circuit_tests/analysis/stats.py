"""Rates and their uncertainty: shares counted exactly, exact binomial tails, percentile bootstrap intervals with a seed of
their own."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Interval = tuple[float, float]


@dataclass(frozen=True)
class Measured:
    """A figure measured on ``n`` held-out examples, with its bootstrap interval.

    It compares as its value (``subject.faithfulness(100) >= 0.8``) and prints with its interval.
    """

    value: float
    interval: Interval
    n: int

    def __float__(self) -> float:
        return float(self.value)

    def __lt__(self, other: float) -> bool:
        return self.value < float(other)

    def __le__(self, other: float) -> bool:
        return self.value <= float(other)

    def __gt__(self, other: float) -> bool:
        return self.value > float(other)

    def __ge__(self, other: float) -> bool:
        return self.value >= float(other)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.3f} (95% CI {low:.3f} to {high:.3f}, n={self.n})"


def fraction_true(flags: torch.Tensor) -> float:
    """The share of non-zero entries, counted: ``hits / total`` as a correctly rounded double.

    A float32 mean is not exact (27 of 30 gives 0.89999998, which fails ``min_accuracy: 0.9``);
    a quotient of counts equals the threshold exactly when the share does.
    """
    return int(torch.count_nonzero(flags)) / flags.numel()


def above_chance(hits: int, n: int, chance: float = 0.5) -> float:
    """The exact one-sided binomial p-value of ``hits`` or more right answers of ``n`` when each is right with
    probability ``chance``: below 0.05, the accuracy exceeds chance with 95% confidence (1.0 when ``n`` is 0)."""
    def log_term(k: int) -> float:  # log of C(n, k) chance^k (1 - chance)^(n - k), finite for any n
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(chance) + (n - k) * math.log1p(-chance)

    return min(1.0, math.fsum(math.exp(log_term(k)) for k in range(max(hits, 0), n + 1)))


def mean_measured(values: torch.Tensor, seed: int = 0) -> Measured:
    """The mean of per-example ``values`` with its bootstrap interval."""
    return Measured(values.double().mean().item(), bootstrap(lambda v: v.mean(-1), [values], seed=seed), values.numel())


def bootstrap(
    statistic: Callable[..., torch.Tensor],
    samples: Sequence[torch.Tensor], n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """A percentile confidence interval for ``statistic(*samples)``, resampling examples (the last dim) with ``seed``.

    Every resample is taken at once: the samples come to ``statistic`` with a dim of ``n_resamples`` inserted before
    their last, and it must reduce the last dim only (``lambda v: v.mean(-1)``), giving one value per resample.
    """
    n = samples[0].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (n_resamples, n), generator=generator)
    values = torch.as_tensor(statistic(*(s[..., draws] for s in samples))).float()
    if values.shape != (n_resamples,):
        raise ValueError(f"a bootstrap statistic must give one value per resample ({n_resamples}), not shape {tuple(values.shape)}: "
                         "reduce the last dim only, e.g. v.mean(-1)")
    tail = (1 - level) / 2
    return float(values.quantile(tail)), float(values.quantile(1 - tail))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's r between two equally long vectors (NaN when either is constant)."""
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])
