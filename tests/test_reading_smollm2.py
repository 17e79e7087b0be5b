"""Neuron cards mean something on SmolLM2: the subject-verb agreement circuit's late nodes write verb forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuit_tests.analysis.cards import lens_tokens, output_lens
from circuit_tests.model.sites import NeuronSites

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VERB_FORMS = {"is", "are", "was", "were", "has", "have", "isn", "aren", "wasn", "weren", "'re", "'s"}


def test_the_strongest_late_subject_nodes_of_agreement_write_verb_forms(smollm2, request):
    """The shipped sva_simple baseline's 8 strongest nodes in layers 20-29 (all at the subject, the prompt's last token):
    6 of them have a verb form among the 6 tokens they promote or suppress most (measured: L28/N907 promotes ' were',
    ' are' and suppresses ' is', ' has'; L25/N161 promotes ' are'; L29/N870 suppresses ' was', ' is'; the other two
    write pronouns: L24/N1136 ' its' against ' his', and L27/N1010 verbs of speech)."""
    stored = json.loads((ROOT / "specs" / "sva_simple.baseline.json").read_text())["models"]["smollm2-135m-instruct"]["circuit"]
    late = [(layer, neuron) for layer, position, neuron, _ in stored if layer >= 20 and position == -1][:8]
    assert len(late) == 8
    lens = output_lens(NeuronSites(smollm2.model), late)
    writers = []
    for (layer, neuron), row in zip(late, lens):
        promotes, suppresses = lens_tokens(smollm2.tokenizer, row, 6)
        if VERB_FORMS & {token.strip().lower() for token, _ in promotes + suppresses}:
            writers.append(f"L{layer}/N{neuron}")
    request.config.pluginmanager.get_plugin("terminalreporter").write_line(
        f"\nverb-form writers among the 8 strongest late agreement nodes: {len(writers)} ({', '.join(writers)})")
    assert len(writers) >= 5
