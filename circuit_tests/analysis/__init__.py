"""The analysis layer: scores for every node, circuits chosen from them, and what circuits do.

``metrics`` reads a number off the next-token logits; ``relp`` and ``attribution`` score every
node in one backward pass; ``selection`` ranks nodes and chooses circuits; ``measures`` runs the
model with circuits ablated, patched or scaled (faithfulness, completeness, flips, steering);
``stats`` gives bootstrap intervals. It builds on :mod:`circuit_tests.model` and knows no spec.
"""
