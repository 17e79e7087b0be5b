"""Neuron cards: what one MLP neuron does, read off the checkpoint itself.

A card answers "what is this node?" from three sources, none of which needs anything but the model:

- its **output direction**: the tokens the neuron's down-projection column promotes and suppresses
  through the unembedding (a logit lens of the neuron, :func:`output_lens`), the column passed
  through the norms the model applies to an MLP's output (Gemma's and OLMo 2's post-MLP norm, then
  the final norm) as the model's own modules compute them;
- its **top-activating contexts**: the strongest positive and negative activations over a text
  corpus (one sentence per line; :data:`CORPUS` ships with the package), found in one batched pass
  that folds every neuron of every layer into a running top-k (:func:`corpus_extremes`);
- for a node of a spec, the **token at its position** in the spec's prompts and its attribution score
  and rank (the spec layer adds those: :mod:`circuit_tests.spec.reading`).

A gated neuron ``act(gate) * up`` can be negative; "promotes" is what a positive activation adds to
the logits, and a negative one adds the opposite. Lens values are logits per unit of the normed
column, comparable within a card, not across models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from circuit_tests.model.nodes import Node, format_node
from circuit_tests.model.sites import NeuronSites, next_token_logits, on_neurons
from circuit_tests.progress import bar
from circuit_tests.text import printable, quoted

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
LENS_TOKENS = 8  # promoted and suppressed tokens on a card
CONTEXTS = 5  # top-activating contexts kept per neuron and sign
MAX_SENTENCE_TOKENS = 64  # longer corpus lines are cut
STRIDE = 1 << 16  # where = sentence * STRIDE + token, in one int64


@dataclass(frozen=True)
class Context:
    """One activation of a neuron in the corpus: the sentence around the token, and the value."""

    before: str
    token: str
    after: str
    value: float

    def text(self) -> str:
        """The context on one line, the token in double brackets, anything a terminal would act on escaped."""
        return printable(f"{self.before}[[{self.token}]]{self.after}", one_line=True)


@dataclass(frozen=True)
class Card:
    """What a node does, as far as the checkpoint alone says."""

    node: Node
    promotes: tuple[tuple[str, float], ...]
    suppresses: tuple[tuple[str, float], ...]
    positive: tuple[Context, ...] = ()  # the strongest positive activations in the corpus
    negative: tuple[Context, ...] = ()  # the strongest negative ones
    at_position: tuple[tuple[str, int], ...] = ()  # the tokens at the node's position in a spec's prompts, with counts
    score: float | None = None
    rank: int | None = None  # 1-based, in the attribution ranking now
    baseline_rank: int | None = None  # 1-based, in the stored baseline circuit; None when it is not there
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """One line: ``L26/P-1/N630 at ' writers', ' engineer', ...: promotes ' are', ' were', "'re"; suppresses ...``."""
        at = f" at {', '.join(quoted(token) for token, _ in self.at_position[:2])}" if self.at_position else ""
        at += ", ..." if len(self.at_position) > 2 else ""
        return (f"{format_node(self.node)}{at}: promotes {_tokens(self.promotes[:3])}; "
                f"suppresses {_tokens(self.suppresses[:3])}")

    def lines(self) -> list[str]:
        """The card for a terminal."""
        out = [format_node(self.node)]
        if self.at_position:
            out.append("  token here: " + counted(self.at_position))
        if self.score is not None:
            baseline = f", rank {self.baseline_rank} in the baseline" if self.baseline_rank else ""
            out.append(f"  attribution: {self.score:+.4g}, rank {self.rank}{baseline}")
        out.append("  promotes:   " + _tokens(self.promotes, values=True))
        out.append("  suppresses: " + _tokens(self.suppresses, values=True))
        for title, contexts in (("most positive", self.positive), ("most negative", self.negative)):
            if contexts:
                out.append(f"  {title} in the corpus:")
                out.extend(f"    {c.value:+8.3f}  {c.text()}" for c in contexts)
        out.extend(f"  note: {note}" for note in self.notes)
        return out

    def to_json(self) -> dict:
        record = asdict(self)
        record["node"] = list(self.node)
        record["name"] = format_node(self.node)
        return record

    @classmethod
    def from_json(cls, data: dict) -> Card:
        """The card :meth:`to_json` wrote (as reports carry it between processes)."""
        return cls(
            node=tuple(data["node"]), promotes=_pairs(data.get("promotes", ())), suppresses=_pairs(data.get("suppresses", ())),
            positive=tuple(Context(**c) for c in data.get("positive", ())), negative=tuple(Context(**c) for c in data.get("negative", ())),
            at_position=tuple((str(token), int(count)) for token, count in data.get("at_position", ())),
            score=data.get("score"), rank=data.get("rank"), baseline_rank=data.get("baseline_rank"), notes=tuple(data.get("notes", ())))


def _pairs(items) -> tuple[tuple[str, float], ...]:
    return tuple((str(token), float(value)) for token, value in items)


def counted(pairs: Sequence[tuple[str, int]]) -> str:
    """Tokens with how often they occur: ``' me' x22, ' was' x9``."""
    return ", ".join(f"{quoted(token)} x{count}" for token, count in pairs)


def _tokens(pairs: Sequence[tuple[str, float]], values: bool = False) -> str:
    return ", ".join(f"{quoted(token)}" + (f" {value:+.2f}" if values else "") for token, value in pairs) or "none"


# --------------------------------------------------------------------------- output direction


@torch.no_grad()
def output_lens(sites: NeuronSites, neurons: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[len(neurons), vocab]``: the logits each (layer, neuron)'s down-projection column adds through the unembedding.

    The column goes through the layer's post-MLP norm when the block has one, then the final norm; the
    norm of a zero vector (a LayerNorm's bias) is subtracted, so only the neuron's own direction counts.
    """
    head = sites.model.get_output_embeddings()
    final_norm = sites.model.get_submodule(sites.arch.final_norm)
    rows = []
    for layer, neuron in neurons:
        site = sites.sites[layer]
        weight = site.down_proj.weight
        column = weight[neuron] if type(site.down_proj).__name__ == "Conv1D" else weight[:, neuron]
        post = getattr(site.block, "post_feedforward_layernorm", None)
        direction = post(column.unsqueeze(0)) if post is not None else column.unsqueeze(0)
        rows.append(direction.to(head.weight.device))
    directions = torch.cat(rows)
    normed = final_norm(directions.to(_weight_device(final_norm, directions)))
    zero = final_norm(torch.zeros_like(directions[:1]).to(normed.device))
    return (head(normed.to(head.weight.device)) - head(zero.to(head.weight.device))).float().cpu()


def _weight_device(module: torch.nn.Module, default: torch.Tensor) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else default.device


def lens_tokens(tokenizer: PreTrainedTokenizerBase, lens: torch.Tensor, k: int = LENS_TOKENS
                ) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]:
    """The ``k`` tokens a lens row promotes most and the ``k`` it suppresses most, decoded, with their values."""
    top, bottom = lens.topk(k), (-lens).topk(k)
    return (tuple((tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)),
            tuple((tokenizer.decode([int(i)]), -float(v)) for v, i in zip(bottom.values, bottom.indices)))


# --------------------------------------------------------------------------- top-activating contexts


@dataclass(frozen=True)
class Extremes:
    """Per layer and neuron, the ``k`` largest and ``k`` smallest activations over a corpus and where each occurred
    (``sentence * STRIDE + token``): ``[layers, neurons, k]`` tensors, strongest first."""

    top: torch.Tensor
    top_at: torch.Tensor
    bottom: torch.Tensor
    bottom_at: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"top": self.top, "top_at": self.top_at, "bottom": self.bottom, "bottom_at": self.bottom_at}


def read_corpus(path: Path = CORPUS) -> list[str]:
    """The corpus's sentences: one per non-empty line."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tokenize_corpus(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str]) -> list[list[int]]:
    """Each sentence's token ids as the model reads a prompt (special tokens included), cut at MAX_SENTENCE_TOKENS."""
    return [tokenizer(sentence).input_ids[:MAX_SENTENCE_TOKENS] for sentence in sentences]


def _padded_batches(ids: Sequence[list[int]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Sentences of similar length together: ``(sentence indices, [batch, tokens] ids, mask)``, right-padded."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chosen)
        tokens = torch.zeros(len(chosen), width, dtype=torch.long)
        mask = torch.zeros(len(chosen), width, dtype=torch.long)
        for row, i in enumerate(chosen):
            tokens[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        yield torch.tensor(chosen), tokens, mask


@torch.no_grad()
def corpus_extremes(sites: NeuronSites, ids: Sequence[list[int]], k: int = CONTEXTS, batch_size: int = 32) -> Extremes:
    """One pass over the tokenized corpus, folding each layer's activations into its running top-``k`` and bottom-``k``
    as the layer runs (memory holds one layer's batch of activations, never the corpus's)."""
    best = {sign: [(torch.empty(sites.n_neurons, 0), torch.empty(sites.n_neurons, 0, dtype=torch.long))] * sites.n_layers
            for sign in (1.0, -1.0)}  # per sign and layer: ([neurons, k] values, their places)
    for sentences, tokens, mask in bar(list(_padded_batches(ids, batch_size)), "corpus pass"):
        keep = mask.flatten().bool()
        places = (sentences.view(-1, 1) * STRIDE + torch.arange(tokens.shape[1])).flatten()[keep]

        def fold(layer: int, neurons: torch.Tensor) -> None:
            values = neurons.detach().flatten(0, 1)[keep.to(neurons.device)].float().T.contiguous().cpu()  # [neurons, tokens]
            for sign, found in best.items():
                batch = (sign * values).topk(min(k, values.shape[1]), dim=1)
                merged = torch.cat([found[layer][0], batch.values], 1)
                merged_at = torch.cat([found[layer][1], places[batch.indices]], 1)
                kept = merged.topk(min(k, merged.shape[1]), dim=1)
                found[layer] = kept.values, merged_at.gather(1, kept.indices)

        with on_neurons(sites, fold):
            next_token_logits(sites.model, tokens.to(sites.device), mask.to(sites.device))

    def stacked(sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        return sign * torch.stack([values for values, _ in best[sign]]), torch.stack([at for _, at in best[sign]])

    return Extremes(*stacked(1.0), *stacked(-1.0))


def contexts(tokenizer: PreTrainedTokenizerBase, ids: Sequence[list[int]], values: torch.Tensor, places: torch.Tensor,
             width: int = 12) -> tuple[Context, ...]:
    """The corpus contexts at ``places`` (``sentence * STRIDE + token``), up to ``width`` tokens either side."""
    found = []
    for value, place in zip(values.tolist(), places.tolist()):
        sentence, token = divmod(int(place), STRIDE)
        tokens = ids[sentence]
        found.append(Context(tokenizer.decode(_without_special(tokenizer, tokens[max(0, token - width) : token])),
                             tokenizer.decode([tokens[token]]),
                             tokenizer.decode(tokens[token + 1 : token + 1 + width]), float(value)))
    return tuple(found)


def _without_special(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [t for t in tokens if t not in special]
