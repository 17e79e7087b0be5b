"""Paired prompts (clean / counterfactual) and their tokenisation into aligned batches.

A dataset is JSON lines ``{"clean_prefix", "patch_prefix", "clean_answer", "patch_answer"}``
(answers carry their leading space, as in Marks et al.). Unpaired prompts for case studies,
``{"prompt", "answer"}``, become examples whose counterfactual is the prompt itself; attribute
them against a ``zero`` or ``mean`` baseline. Tokenisation checks what attribution
relies on: each answer is one token, and the two prefixes of a pair have the same token length
so that positions align. Pairs that fail the length check are dropped and reported, never
silently misaligned.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from circuit_tests.errors import SpecError
from circuit_tests.files import DATASET_LIMIT, DuplicateKey, UnreadableInput, read_text, unique_keys
from circuit_tests.text import SURROGATE_FIX, has_surrogate

MAX_EXAMPLES = 100_000
FIELDS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
UNPAIRED_FIELDS = ("prompt", "answer")


@dataclass(frozen=True)
class PairedExample:
    """One clean prompt and its counterfactual, each with the answer the model should give."""

    clean_prefix: str
    patch_prefix: str
    clean_answer: str
    patch_answer: str
    source: str = "<inline>"  # "file.jsonl:12", for error messages

    @property
    def paired(self) -> bool:
        return (self.clean_prefix, self.clean_answer) != (self.patch_prefix, self.patch_answer)

    @property
    def content(self) -> tuple[str, str, str, str]:
        """What makes two examples the same example, wherever each was written."""
        return self.clean_prefix, self.patch_prefix, self.clean_answer, self.patch_answer


@dataclass(frozen=True)
class Repeat:
    """An example that repeats an earlier one (the same prefixes and answers)."""

    example: PairedExample
    first: PairedExample

    def __str__(self) -> str:
        return f"{self.example.source} repeats {self.first.source}"


def repeats(examples: Iterable[PairedExample]) -> list[Repeat]:
    """Each example that repeats an earlier one, with the first of them."""
    first: dict[tuple[str, ...], PairedExample] = {}
    found = []
    for example in examples:
        if example.content in first:
            found.append(Repeat(example, first[example.content]))
        else:
            first[example.content] = example
    return found


def parse_example(record: object, source: str) -> PairedExample:
    """Check one record's fields and build an example; errors name ``source`` and the field."""
    if not isinstance(record, dict):
        raise SpecError(f"{source}: expected an object with fields {', '.join(FIELDS)}, got {type(record).__name__}.")
    if "prompt" in record and not set(FIELDS) & record.keys():
        prompt, answer = _strings(record, UNPAIRED_FIELDS, source)
        return PairedExample(prompt, prompt, answer, answer, source=source)
    example = PairedExample(*_strings(record, FIELDS, source), source=source)
    if example.clean_answer == example.patch_answer:
        raise SpecError(f"{source}: clean_answer and patch_answer are both {example.clean_answer!r}, so no measurement "
                        "can tell them apart. Give the counterfactual's own answer as patch_answer.")
    return example


def _strings(record: dict, fields: Sequence[str], source: str) -> list[str]:
    missing = [name for name in fields if name not in record]
    if missing:
        raise SpecError(
            f"{source}: missing field(s) {', '.join(missing)}; each example needs {', '.join(FIELDS)} "
            f"(or, unpaired, {', '.join(UNPAIRED_FIELDS)})."
        )
    for name in fields:
        if not isinstance(record[name], str) or not record[name]:
            raise SpecError(f"{source}: field {name!r} must be a non-empty string, got {record[name]!r}.")
        if has_surrogate(record[name]):
            raise SpecError(f"{source}: field {name!r} is {record[name]!r}: {SURROGATE_FIX}.")
    return [record[name] for name in fields]


def read_jsonl(path: Path, roots: Sequence[Path] | None = None) -> list[PairedExample]:
    """Read a JSON-lines dataset of paired examples (blank lines are skipped), from inside ``roots`` when given."""
    try:
        text = read_text(path, roots, DATASET_LIMIT)
    except UnreadableInput as error:
        raise SpecError(f"Dataset {error}.") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(examples) == MAX_EXAMPLES:
            raise SpecError(f"Dataset {path} has more than {MAX_EXAMPLES} examples (line {number}). Sample it: "
                            "a circuit is traced on at most task.max_train examples, and a test split of a few hundred "
                            "pairs gives tight intervals.")
        try:
            record = json.loads(line, object_pairs_hook=unique_keys)
        except DuplicateKey as key:
            raise SpecError(f"{path}:{number}: field {key} is given twice (the second would silently replace the first). "
                            "Keep one.") from None
        except (json.JSONDecodeError, RecursionError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
            raise SpecError(f"{path}:{number}: not valid JSON ({reason}). Each line must be one JSON object.") from None
        examples.append(parse_example(record, f"{path}:{number}"))
    if not examples:
        raise SpecError(f"Dataset {path} has no examples. Add JSON lines with fields {', '.join(FIELDS)}.")
    return examples


@dataclass(frozen=True)
class PairedBatch:
    """Examples whose prefixes all have the same token length, as tensors."""

    clean_ids: torch.Tensor  # [batch, positions]
    patch_ids: torch.Tensor  # [batch, positions]
    clean_answer: torch.Tensor  # [batch] token ids
    patch_answer: torch.Tensor  # [batch] token ids
    examples: tuple[PairedExample, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_positions(self) -> int:
        return self.clean_ids.shape[1]

    def rows(self, rows: slice) -> PairedBatch:
        return PairedBatch(
            self.clean_ids[rows], self.patch_ids[rows], self.clean_answer[rows], self.patch_answer[rows], self.examples[rows]
        )

    def repeat(self, copies: int) -> PairedBatch:
        """The batch stacked ``copies`` times (copy-major), for evaluating several variants in one pass."""
        return PairedBatch(
            self.clean_ids.repeat(copies, 1),
            self.patch_ids.repeat(copies, 1),
            self.clean_answer.repeat(copies),
            self.patch_answer.repeat(copies),
            self.examples * copies,
        )

    def to(self, device: torch.device | str) -> PairedBatch:
        return PairedBatch(
            self.clean_ids.to(device),
            self.patch_ids.to(device),
            self.clean_answer.to(device),
            self.patch_answer.to(device),
            self.examples,
        )


@dataclass(frozen=True)
class Dropped:
    """A pair that cannot be measured, and why: its two prefixes tokenize to different lengths."""

    example: PairedExample
    clean_tokens: int
    patch_tokens: int

    def __str__(self) -> str:
        return (f"{self.example.source}: the clean prefix is {self.clean_tokens} tokens and the counterfactual "
                f"{self.patch_tokens}, so positions do not align")


@dataclass(frozen=True)
class Tokenized:
    """Batches grouped by prompt length, and the pairs dropped because their prefixes differ in length."""

    batches: tuple[PairedBatch, ...]
    dropped: tuple[Dropped, ...] = field(default=())

    @property
    def n_examples(self) -> int:
        return sum(len(batch) for batch in self.batches)

    @property
    def examples(self) -> list[PairedExample]:
        return [example for batch in self.batches for example in batch.examples]

    def chunks(self, size: int) -> list[PairedBatch]:
        """The batches cut into pieces of at most ``size`` examples (memory scales with ``size``)."""
        return [batch.rows(slice(start, start + size)) for batch in self.batches for start in range(0, len(batch), size)]


def answer_token(tokenizer: PreTrainedTokenizerBase, answer: str, source: str, name: str) -> int:
    """The single token id of an answer; an answer of several tokens is an error naming its source."""
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise SpecError(
            f"{source}: {name} {answer!r} is {len(ids)} tokens {pieces} for this tokenizer, but answers must be "
            "one token. Pick a word that is a single token (with its leading space), or drop the example."
        )
    return ids[0]


def in_chat(example: PairedExample, tokenizer: PreTrainedTokenizerBase, system: str | None, assistant_prefix: str) -> PairedExample:
    """The example with both prefixes as the user turn of ``tokenizer``'s chat template, the assistant's turn begun."""
    return replace(example, clean_prefix=chat_prompt(tokenizer, example.clean_prefix, system, assistant_prefix),
                   patch_prefix=chat_prompt(tokenizer, example.patch_prefix, system, assistant_prefix))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None, assistant_prefix: str) -> str:
    """The chat-formatted text; a BOS the template writes is dropped when the tokenizer adds its own."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


@dataclass(frozen=True)
class TokenLimit:
    """The longest prompt allowed, in tokens, and what sets it (a spec field, the model's context)."""

    tokens: int
    reason: str


def tokenize_pairs(examples: Iterable[PairedExample], tokenizer: PreTrainedTokenizerBase, limit: TokenLimit | None = None) -> Tokenized:
    """Tokenise paired examples into batches of equal prompt length; a prompt over ``limit`` is an error."""
    groups: dict[int, list[tuple[list[int], list[int], int, int, PairedExample]]] = defaultdict(list)
    dropped = []
    for example in examples:
        clean, patch, answers = _tokenize(example, tokenizer, limit)
        if len(clean) != len(patch):
            dropped.append(Dropped(example, len(clean), len(patch)))
            continue
        groups[len(clean)].append((clean, patch, *answers, example))
    return Tokenized(tuple(_batch(rows) for _, rows in sorted(groups.items())), tuple(dropped))


@dataclass(frozen=True)
class PairCheck:
    """How one example tokenizes, and whether it can be used: ``problem`` is why not (``None``: usable)."""

    example: PairedExample
    clean: list[str]  # the clean prefix's tokens, as text
    patch: list[str]
    problem: str | None = None
    dropped: bool = False  # the problem only drops the example; other problems stop the spec


def check_pairs(examples: Iterable[PairedExample], tokenizer: PreTrainedTokenizerBase, limit: TokenLimit | None = None) -> list[PairCheck]:
    """What :func:`tokenize_pairs` would make of each example, every problem reported instead of the first raised."""
    checks = []
    for example in examples:
        pieces = [[tokenizer.decode([i]) for i in tokenizer(text).input_ids] for text in (example.clean_prefix, example.patch_prefix)]
        try:
            clean, patch, _ = _tokenize(example, tokenizer, limit)
        except SpecError as error:
            checks.append(PairCheck(example, *pieces, problem=str(error)))
            continue
        drop = str(Dropped(example, len(clean), len(patch))) if len(clean) != len(patch) else None
        checks.append(PairCheck(example, *pieces, problem=drop, dropped=drop is not None))
    return checks


def _tokenize(example: PairedExample, tokenizer: PreTrainedTokenizerBase, limit: TokenLimit | None) -> tuple[list[int], list[int], tuple[int, int]]:
    """Both prefixes' token ids and the two answer tokens; an unusable answer or a prompt over ``limit`` is an error."""
    clean = tokenizer(example.clean_prefix).input_ids
    patch = tokenizer(example.patch_prefix).input_ids
    answers = (
        answer_token(tokenizer, example.clean_answer, example.source, "clean_answer"),
        answer_token(tokenizer, example.patch_answer, example.source, "patch_answer"),
    )
    if example.paired and answers[0] == answers[1]:
        raise SpecError(f"{example.source}: clean_answer {example.clean_answer!r} and patch_answer {example.patch_answer!r} "
                        f"are the same token ({answers[0]}) for this tokenizer, so no measurement can tell them apart. "
                        "Give answers that differ as tokens.")
    longest = max(len(clean), len(patch))
    if limit is not None and longest > limit.tokens:
        raise SpecError(f"{example.source}: a prompt of this example is {longest} tokens, more than the {limit.tokens} "
                        f"allowed ({limit.reason}). Shorten it or drop the example.")
    return clean, patch, answers


def _batch(rows: Sequence[tuple[list[int], list[int], int, int, PairedExample]]) -> PairedBatch:
    clean, patch, clean_answer, patch_answer, examples = zip(*rows)
    return PairedBatch(
        torch.tensor(clean),
        torch.tensor(patch),
        torch.tensor(clean_answer),
        torch.tensor(patch_answer),
        tuple(examples),
    )


def split(examples: Sequence[PairedExample], test_fraction: float, seed: int = 0) -> tuple[list[PairedExample], list[PairedExample]]:
    """A seeded train/test split; attribution sees only the train part, and no held-out example repeats a training one."""
    if not 0 < test_fraction < 1:
        raise SpecError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(test_fraction * len(examples)))
    held = set(order[:n_test])
    train, test = [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
    _refuse_leaks(train, test)
    return train, test


def _refuse_leaks(train: Sequence[PairedExample], test: Sequence[PairedExample]) -> None:
    """A held-out example the trace was fitted on (the same prefixes and answers) would test the training data."""
    trained = {example.content: example for example in train}
    leaks = [Repeat(example, trained[example.content]) for example in test if example.content in trained]
    if leaks:
        raise SpecError(f"{leaks[0].example.source}: this held-out example repeats {leaks[0].first.source}, a training "
                        f"example the circuit is traced on, so the test would measure the training data ({len(leaks)} of "
                        f"{len(test)} held-out examples repeat one; {len(repeats([*train, *test]))} examples in all repeat "
                        "an earlier one). Remove the repeated examples: each pair once.")
