"""Metrics read off the model's next-token logits at the last position of each prompt."""

from __future__ import annotations

import torch

from circuit_tests.data import PairedBatch


def last_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[batch, positions, vocab]`` logits to the ``[batch, vocab]`` logits of the next token, in float32."""
    return logits[:, -1, :].float()


def logit_diff(logits: torch.Tensor, batch: PairedBatch) -> torch.Tensor:
    """Per example, ``logit(clean_answer) - logit(patch_answer)`` at the last position (> 0: the model is right)."""
    last = last_logits(logits)
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, batch.clean_answer.to(last.device)] - last[rows, batch.patch_answer.to(last.device)]
