"""Measuring on a Ray cluster: one actor per checkpoint, the pytest session (or ``circuit-tests run``) the client.

:class:`RayRun` starts an actor per checkpoint (``num_gpus`` from the device the run asked for) and
sends it every (spec, expectation) that needs that checkpoint, in the order the items will run.
Each actor holds a :class:`~circuit_tests.spec.session.CircuitSession` of its own, so a checkpoint
is loaded once across the cluster and its subjects are shared by its specs, exactly as in one
process. What comes back is what an in-process check gives: the :class:`Verdict` (figures as plain
data), the baseline entries it recorded (:meth:`BaselineStore.pending`, as pytest-xdist workers
hand them over) and the baseline key it tested. Only the client writes baselines and reports.

Specs travel with the task (a parsed spec carries its examples); checkpoints are read where they
are, so every node must see the same paths (a shared filesystem, or the same hub cache), and
``stable`` reads the baseline files from the project directory at the same path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from circuit_tests.errors import CircuitTestsError
from circuit_tests.spec.schema import Expectation, Spec

LOCAL = "local"  # --circuit-ray with no address: start a Ray instance on this machine


@dataclass(frozen=True)
class Work:
    """One expectation of one spec on one checkpoint, as an item asks for it."""

    spec: Spec
    model: str
    expectation: Expectation
    from_command_line: bool

    @property
    def key(self) -> tuple[Path, str, str]:
        return self.spec.path, self.model, self.expectation.label


class CheckpointWorker:
    """A Ray actor's body: a session of its own that checks what the client sends, and writes nothing."""

    def __init__(self, options) -> None:
        from circuit_tests.spec.session import CircuitSession

        device = options.load.device
        load = replace(options.load, device="cuda" if device.startswith("cuda:") else device)  # Ray picks the GPU
        self.session = CircuitSession(replace(options, load=load, html=None, json=None, summary=None, ray=None))

    def check(self, work: Work) -> tuple:
        verdict = self.session.check(work.spec, work.model, work.expectation, work.from_command_line)
        pending = self.session.baselines.pending()
        self.session.baselines = type(self.session.baselines)(self.session.baselines.update)
        return verdict, pending, sorted((str(path), key) for path, key in self.session.tested)


def _ray():
    try:
        import ray
    except ImportError:
        raise CircuitTestsError("--circuit-ray needs Ray: pip install 'circuit-tests[ray]'") from None
    return ray


class RayRun:
    """The client's side: actors per checkpoint, futures per item, results taken in item order."""

    def __init__(self, address: str, gpus_per_checkpoint: float) -> None:
        ray = _ray()
        try:
            if not ray.is_initialized():
                if address == LOCAL:
                    ray.init(include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as error:  # noqa: BLE001 -- any failure to reach the cluster is the run's failure, said once
            raise CircuitTestsError(f"--circuit-ray {address}: could not reach the Ray cluster ({type(error).__name__}: "
                                    f"{error}). Start one with `ray start --head`, or give its address.") from None
        self.ray = ray
        self.gpus = gpus_per_checkpoint
        self.futures: dict[tuple[Path, str, str], object] = {}
        self.actors: dict[str, object] = {}

    def submit(self, options, works: Sequence[Work]) -> None:
        """Start an actor per checkpoint and send each its work, in order."""
        actor = self.ray.remote(num_gpus=self.gpus, num_cpus=1, max_restarts=0)(CheckpointWorker)
        for work in works:
            if work.model not in self.actors:
                self.actors[work.model] = actor.remote(options)
            self.futures[work.key] = self.actors[work.model].check.remote(work)

    def result(self, work: Work):
        """The (verdict, pending baselines, tested keys) of submitted work; an actor that died fails its items only."""
        from circuit_tests.spec.session import Verdict

        future = self.futures.pop(work.key, None)
        if future is None:
            raise CircuitTestsError(f"{work.spec.path}: {work.model}: {work.expectation.label} was not sent to the cluster.")
        try:
            return self.ray.get(future)
        except self.ray.exceptions.RayActorError as error:
            return Verdict("failed", f"{work.spec.path}: {work.model}: the Ray actor measuring this checkpoint died "
                                     f"({_cause(error)}); every item of this checkpoint fails, the others go on."), {}, []

    def shutdown(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()


def _cause(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
