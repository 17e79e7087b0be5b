"""Metrics read off the next-token logits at the last position of each prompt.

A :data:`Metric` maps ``[batch, positions, vocab]`` logits and the batch to one value per
example. :data:`METRICS` names the ones attribution can use. The orientation follows
docs/method.md section 3: attribution measures :func:`logit_diff`, ``logit(patch_answer) -
logit(clean_answer)`` (how far a patch pushes towards the counterfactual); evaluation reads
:func:`preference`, the reverse (above 0: the model prefers the clean answer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from circuit_tests.model.data import PairedBatch

Metric = Callable[[torch.Tensor, PairedBatch], torch.Tensor]
TOP_K = 5


def last_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[batch, positions, vocab]`` logits to the ``[batch, vocab]`` logits of the next token, in float32."""
    return logits[:, -1, :].float()


def _pick(last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return last.gather(1, tokens.to(last.device).view(-1, 1)).squeeze(1)


def preference(logits: torch.Tensor, batch: PairedBatch) -> torch.Tensor:
    """``logit(clean_answer) - logit(patch_answer)``: above 0, the model prefers the clean answer."""
    last = last_logits(logits)
    return _pick(last, batch.clean_answer) - _pick(last, batch.patch_answer)


def logit_diff(logits: torch.Tensor, batch: PairedBatch) -> torch.Tensor:
    """``logit(patch_answer) - logit(clean_answer)``: the attribution metric of paired tasks."""
    return -preference(logits, batch)


def target_logit(logits: torch.Tensor, batch: PairedBatch) -> torch.Tensor:
    """The logit of the clean answer."""
    return _pick(last_logits(logits), batch.clean_answer)


def target_prob(logits: torch.Tensor, batch: PairedBatch) -> torch.Tensor:
    """The probability of the clean answer."""
    return _pick(last_logits(logits).softmax(-1), batch.clean_answer)


def top_k_logits(logits: torch.Tensor, batch: PairedBatch) -> torch.Tensor:
    """The sum of the model's own top-5 next-token logits (unpaired case studies, zero baseline)."""
    last = last_logits(logits)
    return last.gather(1, last.detach().topk(TOP_K).indices).sum(1)


METRICS: dict[str, Metric] = {
    "logit_diff": logit_diff,
    "target_logit": target_logit,
    "target_prob": target_prob,
    "top_k_logits": top_k_logits,
}
