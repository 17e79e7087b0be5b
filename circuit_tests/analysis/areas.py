"""MIB's faithfulness curve and its two areas: how the field compares circuits (circuit localization track).

The curve is the faithfulness ``(F(C) - F(empty)) / (F(M) - F(empty))`` of the top circuits of
:data:`FRACTIONS` of all nodes (0.1% to 100%; a size is the fraction times the number of nodes,
rounded down, as MIB counts it). Its two summaries, by the trapezoid rule over the fraction (a
linear axis from 0.001 to 1):

- **CPR**, the area under the curve: higher is better, about 1 for a circuit that is faithful at
  every size (it can pass 1 where a circuit overshoots the model);
- **CMD**, the area between the curve and 1, ``|1 - f|``: lower is better, 0 for a perfect one.

Both depend on how nodes are ranked (:data:`RANKINGS`: by ``absolute`` score, or by ``signed``
score, strongest support for the counterfactual answer first) and on the ablation; a figure is
reported with both named.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RANKINGS = ("absolute", "signed")


def sizes_for(n_nodes: int) -> list[int]:
    """The circuit size at each of :data:`FRACTIONS` of ``n_nodes``, rounded down."""
    return [int(fraction * n_nodes) for fraction in FRACTIONS]


def areas(faithfulness: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """(CPR, CMD) of a curve measured at :data:`FRACTIONS`: the trapezoid areas under ``f`` and under ``|1 - f|``."""
    cpr, cmd = area_tensors(torch.as_tensor(faithfulness, dtype=torch.float64))
    return float(cpr), float(cmd)


def area_tensors(faithfulness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CPR, CMD) of curves whose first dim runs over :data:`FRACTIONS`, one per index of the other dims (resamples)."""
    f = faithfulness.to(torch.float64)
    x = torch.tensor(FRACTIONS, dtype=torch.float64)
    return torch.trapezoid(f, x, dim=0), torch.trapezoid((1 - f).abs(), x, dim=0)


# The areas of a circuit that recovers nothing short of the whole model: faithfulness 0 at every fraction but the last,
# where the circuit is every node and so the model (1). A threshold this curve meets (CPR at most 0.25, CMD at least
# 0.749) could hold for a circuit that does nothing, so a spec may not claim it.
CPR_OF_NOTHING, CMD_OF_NOTHING = areas([0.0] * (len(FRACTIONS) - 1) + [1.0])
