"""Spec files as pytest items, following pytest's documented YAML example.

:func:`~circuit_tests.plugin.pytest_collect_file` turns a spec file into a :class:`SpecFile`,
which yields a :class:`SpecNode` for the spec, which yields one :class:`ExpectationItem` per
expectation and model, parametrized by the model the way pytest parametrizes a test:
``specs/sva_simple.yaml::sva-simple::sparse[smollm2-135m-instruct]``. (The model stays in the
trailing brackets, where pytest reads parameters, so that node ids given on the command line,
``--lf`` and ``--ff`` find the item.) A spec that cannot be read is one failing
:class:`BrokenSpecItem`; every other spec still runs. An item asks the session for a verdict and
shows it: a failure as the domain report (``repr_failure``), never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from circuit_tests.errors import CircuitTestsError
from circuit_tests.model.series import Checkpoint, in_training_order
from circuit_tests.plugin import SESSION
from circuit_tests.progress import on_terminal
from circuit_tests.spec.distributed import Work
from circuit_tests.spec.report import PROPERTY, encode, payload
from circuit_tests.spec.schema import Expectation, Spec, load_spec
from circuit_tests.text import printable, shown


class SpecFile(pytest.File):
    """A YAML spec; a spec that cannot be read becomes one failing item with the reason."""

    def collect(self):
        try:
            spec = load_spec(self.path, self.config.rootpath)
        except CircuitTestsError as error:
            yield BrokenSpecItem.from_parent(self, name="spec", message=str(error))
            return
        except Exception as error:  # noqa: BLE001 -- one unreadable spec must never stop the session
            yield BrokenSpecItem.from_parent(self, name="spec", message=(
                f"{self.path}: circuit-tests failed while reading this spec ({type(error).__name__}: {error}). "
                "This is a bug in circuit-tests; please report it with the spec."))
            return
        yield SpecNode.from_parent(self, name=spec.name, spec=spec)


class SpecNode(pytest.Collector):
    """One spec: an item per (model, expectation), grouped by model so a model's items run together."""

    def __init__(self, *, spec: Spec, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec

    def collect(self):
        series = self.config.stash[SESSION].options.series
        given = [checkpoint.name for checkpoint in series] or list(dict.fromkeys(self.config.getoption("circuit_model")))
        for model in given or self.spec.models:
            for expectation in self.spec.expectations:
                item = ExpectationItem.from_parent(self, name=f"{expectation.label}[{model}]", model=model,
                                                   expectation=expectation, from_command_line=bool(given))
                for marker in ("circuit", *self.spec.markers):
                    item.add_marker(marker)
                if series:  # under `pytest -n N --dist loadgroup`, a checkpoint's items share one worker and one load
                    item.add_marker(pytest.mark.xdist_group(model))
                yield item


class ExpectationItem(pytest.Item):
    """One expectation of one spec on one model."""

    def __init__(self, *, model: str, expectation: Expectation, from_command_line: bool, parent: SpecNode, **kwargs) -> None:
        super().__init__(parent=parent, nodeid=_parametrized_id(parent, expectation.label, model), **kwargs)
        self.model = model
        self.expectation = expectation
        self.from_command_line = from_command_line

    @property
    def work(self) -> Work:
        """What this item asks the session to check (sent ahead to a Ray cluster under ``--circuit-ray``)."""
        return Work(self.parent.spec, self.model, self.expectation, self.from_command_line)

    def runtest(self) -> None:
        session = self.config.stash[SESSION]
        spec = self.parent.spec
        with on_terminal(sys.__stderr__):  # bars for the trace and each measurement, on an interactive terminal only
            verdict = session.check(spec, self.model, self.expectation, self.from_command_line)
        self.user_properties.append((PROPERTY, encode(session.result(spec, self.model, self.expectation, verdict))))
        if verdict.status == "skipped":
            pytest.skip(printable(verdict.message))
        if verdict.status == "failed":
            raise ExpectationFailed(verdict.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, ExpectationFailed):
            return printable(f"{self.nodeid}\n{_indent(str(excinfo.value))}")
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        """The FAILURES header: the item's id from the current directory, as a path (``./``) that pytest runs when pasted.

        The ``./`` also keeps pytest from reading the id as a Python name (it turns dots into ``::`` there).
        """
        where = Path(os.path.relpath(self.path, self.config.invocation_params.dir)).as_posix()
        return self.path, None, f"./{shown(where)}::{str(self.nodeid).split('::', 1)[1]}"


def _parametrized_id(parent: pytest.Collector, name: str, param: str):
    """The node id of ``name[param]`` as pytest builds a parametrized test's, so ``--lf`` can match it.

    pytest 9 keeps ids structured (``NodeId``) and reads the trailing ``[...]`` of a stored id as
    the parameters; pytest 8's string id ``parent::name[param]`` is what the default gives.
    """
    structured = getattr(parent, "id", None)
    return None if structured is None else structured.child(name).with_params(param)


class BrokenSpecItem(pytest.Item):
    """Stands for a spec file that could not be read, so the error shows as one failed item."""

    def __init__(self, *, message: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.message = message

    def runtest(self) -> None:
        self.user_properties.append((PROPERTY, encode(payload(self.path.name, "-", self.path, "spec") | {"message": self.message})))
        raise ExpectationFailed(self.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        return printable(f"invalid circuit spec: {self.message}")

    def reportinfo(self):
        return self.path, None, "spec"


class ExpectationFailed(Exception):
    """An expectation that did not hold (or could not be checked); its message is the domain report."""


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())




def in_series(items: list[pytest.Item], series: Sequence[Checkpoint]) -> None:
    """Reorder the spec items of ``items`` in place, checkpoint by checkpoint (spec order kept within one); other items
    keep their places."""
    slots = [index for index, item in enumerate(items) if isinstance(item, ExpectationItem)]
    place = in_training_order(series)
    ordered = sorted((items[index] for index in slots), key=lambda item: place(item.model))
    for index, item in zip(slots, ordered):
        items[index] = item
