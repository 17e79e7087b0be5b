"""Reading a circuit on tiny models: neuron cards (output direction, corpus contexts), edges against exact patching,
clusters, and the ``explain`` and ``graph`` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuit_tests.analysis.attribution import AttributionOptions, attribute
from circuit_tests.analysis.cards import Card, Context, corpus_extremes, output_lens, tokenize_corpus
from circuit_tests.analysis.edges import cluster, edge_weights, exact_edge_weights
from circuit_tests.analysis.selection import top_k
from circuit_tests.cli import main
from circuit_tests.model.data import PairedBatch, Tokenized
from circuit_tests.model.nodes import format_node, parse_node
from circuit_tests.model.sites import NeuronSites, capture
from circuit_tests.testing import TINY_WORDS, save_tiny_checkpoint, tiny_model, tiny_tokenizer

pytest_plugins = ["pytester"]

SENTENCES = ["The author is near the key .", "The bakers are by the cabinets", "The pilot", "The doctors of the farmer were"]


def _data() -> Tokenized:
    generator = torch.Generator().manual_seed(5)

    def batch(rows: int, length: int) -> PairedBatch:
        ids = [torch.randint(3, 256, (rows, length), generator=generator) for _ in range(2)]
        answers = torch.randint(3, 256, (2, rows), generator=generator)
        return PairedBatch(ids[0], ids[1], answers[0], answers[1], tuple(range(rows)))

    return Tokenized((batch(6, 5), batch(4, 7)))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_edge_estimates_track_exact_patching_of_the_upstream_node(model_type):
    """Measured Pearson r over the ~500 node pairs with a path, prompts of two lengths: atp 0.997 / 0.927 / 0.997,
    relp 0.912 / 0.883 / 0.971 (llama / gemma3_text / gpt2)."""
    sites, data = NeuronSites(tiny_model(model_type).requires_grad_(False)), _data()
    nodes = list(top_k(attribute(sites, data.batches), 40).nodes)
    exact = exact_edge_weights(sites, data, nodes)
    path = torch.tensor([[a[0] < b[0] for b in nodes] for a in nodes])
    assert (exact[~path] == 0).all() and (exact[path] != 0).sum() > 300
    for method, floor in (("atp", 0.9), ("relp", 0.85)):
        estimate = edge_weights(sites, data, nodes, AttributionOptions(method=method))
        assert (estimate[~path] == 0).all()
        assert _pearson(estimate[path], exact[path]) >= floor, method


def test_the_output_lens_is_the_column_through_the_model_norms_and_the_unembedding():
    """RMSNorm models: W_U (w * column), up to a positive scale; GPT-2's LayerNorm also centres it; Gemma 3 applies its
    post-MLP norm too, and both of its norms scale by (1 + weight)."""
    for model_type in ("llama", "gpt2", "gemma3_text"):
        model = tiny_model(model_type).requires_grad_(False)
        sites = NeuronSites(model)
        torch.manual_seed(0)
        for norm in model.modules():  # random norm weights, so that a norm left out would show
            if "Norm" in type(norm).__name__ and getattr(norm, "weight", None) is not None:
                norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
        layer, neuron = sites.n_layers - 1, 5
        site = sites.sites[layer]
        if model_type == "gpt2":
            column = site.down_proj.weight[neuron]
            column = (column - column.mean()) * model.transformer.ln_f.weight
        else:
            column = site.down_proj.weight[:, neuron]
            if model_type == "gemma3_text":
                column = column * (1 + site.block.post_feedforward_layernorm.weight) * (1 + model.model.norm.weight)
            else:
                column = column * model.model.norm.weight
        expected = model.get_output_embeddings().weight @ column
        lens = output_lens(sites, [(layer, neuron)])[0]
        assert torch.nn.functional.cosine_similarity(lens, expected, dim=0) > 0.9999, model_type


def test_the_corpus_pass_finds_each_neurons_extremes_as_single_sentence_runs_do():
    model = tiny_model("llama").requires_grad_(False)
    sites, tokenizer = NeuronSites(model), tiny_tokenizer()
    ids = tokenize_corpus(tokenizer, SENTENCES)
    found = corpus_extremes(sites, ids, k=3, batch_size=3)  # padded batches of several lengths
    everything = []
    with torch.no_grad():
        for sentence in ids:
            with capture(sites) as acts:
                model(torch.tensor([sentence]))
            everything.append(torch.stack([a[0] for a in acts]))  # [layers, tokens, neurons]
    values = torch.cat(everything, 1)  # [layers, all tokens, neurons]
    expected_top = values.topk(3, dim=1).values.transpose(1, 2)
    expected_bottom = (-values).topk(3, dim=1).values.transpose(1, 2).neg()
    torch.testing.assert_close(found.top, expected_top)
    torch.testing.assert_close(found.bottom, expected_bottom)
    sentence, token = divmod(int(found.top_at[1, 7, 0]), 1 << 16)  # where the top value sits holds that value
    torch.testing.assert_close(everything[sentence][1, token, 7], found.top[1, 7, 0])


def test_clusters_follow_the_edge_pattern_and_do_not_depend_on_node_order():
    weights = torch.zeros(6, 6)
    weights[0, 3] = weights[1, 3] = 1.0  # 0 and 1 feed 3
    weights[2, 4] = weights[2, 5] = 1.0  # 2 feeds 4 and 5
    found = cluster(weights, 4)  # {0, 1} send alike, {4, 5} receive alike; 2 and 3 are alone
    assert found == (0, 0, 1, 2, 3, 3)
    order = [5, 4, 3, 2, 1, 0]
    again = cluster(weights[order][:, order], 4)
    assert [again[order.index(i)] == again[order.index(j)] for i in range(6) for j in range(6)] == \
        [found[i] == found[j] for i in range(6) for j in range(6)]


def test_a_card_escapes_what_a_checkpoints_tokenizer_says_and_round_trips_as_json():
    card = Card((3, -1, 7), (("\x1b[31m are", 2.5), (" were", 2.0)), ((" is", -1.0),),
                positive=(Context("the keys to the", " cabinets\x1b]0;", " are", 3.25),), at_position=((" keys", 4),),
                score=-0.5, rank=2, baseline_rank=9)
    text = "\n".join(card.lines()) + card.summary()
    assert "\x1b" not in text and "\\x1b[31m are" in text and "[[ cabinets\\x1b]0;]]" in text
    assert "attribution: -0.5, rank 2, rank 9 in the baseline" in text and "' keys' x4" in text
    assert Card.from_json(json.loads(json.dumps(card.to_json()))) == card


def test_nodes_are_read_back_as_they_are_written():
    for node in ((26, -1, 1071), (3, None, 77), (3, None, None), (2, 0, 5)):
        assert parse_node(format_node(node)) == node
    with pytest.raises(ValueError, match="L<layer>/N<neuron>"):
        parse_node("layer 3 neuron 7")


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reading")
    save_tiny_checkpoint(root / "ckpt")
    (root / "corpus.txt").write_text("\n".join(SENTENCES) + "\n")
    nouns = [word for word in ("author", "baker", "farmer", "doctor", "pilot") if word in TINY_WORDS]
    pairs = [{"clean_prefix": f"The {noun} near the key", "patch_prefix": f"The {noun}s near the key",
              "clean_answer": clean, "patch_answer": patch} for noun in nouns for clean, patch in ((" is", " are"), (" was", " were"))]
    (root / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    (root / "agreement.yaml").write_text(
        "name: agreement\nmodels: [./ckpt]\ntask: {dataset: data.jsonl, test_fraction: 0.5}\n"
        "expect:\n  - behaves: {min_accuracy: 0.6}\n")
    return root


def test_explain_prints_cards_with_contexts_and_spec_figures(tiny_project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tiny_project)
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cards.json"
    assert main(["explain", "./ckpt", "L1/P-1/N3", "L0/N5", "--spec", "agreement.yaml", "--corpus", "corpus.txt",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "L1/P-1/N3\n  token here: 'key' x5" in printed and "attribution: " in printed and "most positive in the corpus:" in printed
    cards = json.loads(out.read_text())
    assert [card["name"] for card in cards] == ["L1/P-1/N3", "L0/N5"] and len(cards[0]["positive"]) == 5
    assert cards[0]["rank"] >= 1 and cards[1]["score"] is None  # a node without a position is not one the spec ranks
    for entry in (tmp_path / "cache").rglob("*.safetensors"):  # a cached corpus pass pointing outside the corpus
        tensors = load_file(str(entry))
        if "top_at" in tensors:
            save_file({**tensors, "top_at": tensors["top_at"] + (1 << 40)}, str(entry))
    assert main(["explain", "./ckpt", "L1/P-1/N3", "L0/N5", "--spec", "agreement.yaml", "--corpus", "corpus.txt"]) == 0
    assert capsys.readouterr().out == printed  # measured again, not trusted
    assert main(["explain", "./ckpt", "neuron 3"]) == 2 and "is not a node" in capsys.readouterr().err
    assert main(["explain", "./ckpt", "L0/N5", "--json", str(tmp_path / "missing" / "cards.json")]) == 2  # refused before any work
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("spec", [[], ["--spec", "agreement.yaml"]])
def test_explain_refuses_a_node_outside_the_model_before_the_corpus_pass(tiny_project, capsys, monkeypatch, tmp_path, spec):
    monkeypatch.chdir(tiny_project)
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("circuit_tests.cli.corpus", lambda *args: pytest.fail("the corpus pass ran"))
    monkeypatch.setattr("circuit_tests.spec.subject.Subject.scores", property(lambda self: pytest.fail("it traced")))
    assert main(["explain", "./ckpt", "L0/N5", "L99/P-1/N5", "L1/N96", "L2", *spec]) == 2
    assert capsys.readouterr().err.strip() == (
        "circuit-tests explain: not a neuron of ./ckpt (3 layers x 96 neurons): L99/P-1/N5, L1/N96, L2. Give "
        "L<layer>/N<neuron> or L<layer>/P<position>/N<neuron> with a layer from 0 to 2 and a neuron from 0 to 95.")


def test_graph_writes_nodes_edges_and_clusters_as_json(tiny_project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tiny_project)
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(tmp_path / "cache"))
    assert main(["graph", "agreement.yaml", "--top", "12", "--clusters", "3", "--json", str(tmp_path / "g.json"),
                 "--html", str(tmp_path / "g.html")]) == 0
    page = (tmp_path / "g.html").read_text()
    assert page.count("<circle") == 12 and "<path d='M" in page and "cluster 2 (" in page
    printed = capsys.readouterr().out
    assert "cluster 0 (" in printed and "strongest edges" in printed and " -> " in printed
    graph = json.loads((tmp_path / "g.json").read_text())
    names = [node["name"] for node in graph["nodes"]]
    assert len(names) == 12 and {node["cluster"] for node in graph["nodes"]} == {0, 1, 2}
    assert graph["edges"] and all(parse_node(e["source"])[0] < parse_node(e["target"])[0] for e in graph["edges"])
    assert sorted(name for c in graph["clusters"] for name in c["members"]) == sorted(names)


def test_the_plugin_draws_each_circuit_as_a_graph_in_the_reports(tiny_project, pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_project / "ckpt", pytester.path / "ckpt")
    shutil.copy(tiny_project / "data.jsonl", pytester.path)
    (pytester.path / "specs").mkdir()
    (pytester.path / "specs" / "agreement.yaml").write_text((tiny_project / "agreement.yaml").read_text()
                                                            .replace("./ckpt", "../ckpt").replace("data.jsonl", "../data.jsonl"))
    result = pytester.runpytest_inprocess("specs", "--circuit-graph", "10", "--circuit-report", "r.html", "--circuit-json", "r.json")
    result.assert_outcomes(passed=1)
    graph = json.loads((pytester.path / "r.json").read_text())["rows"][0]["figures"]["graph"]
    assert len(graph["nodes"]) == 10 and graph["edges"] and graph["clusters"]
    page = (pytester.path / "r.html").read_text()
    assert "Circuit graph: top 10 nodes" in page and page.count("<circle") == 10
    refused = pytester.runpytest_inprocess("specs", "--circuit-graph", "-1")
    refused.stderr.fnmatch_lines(["*--circuit-graph -1: give how many of each circuit's top nodes to draw*"])
