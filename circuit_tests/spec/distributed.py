"""Measuring on a Ray cluster: one actor per checkpoint, the pytest session (or ``circuit-tests run``) the client.

:class:`RayRun` starts an actor per checkpoint and sends it every (spec, expectation) that needs that
checkpoint, in the order the items will run, then asks it to end once that work is done, so that
a cluster smaller than the run frees room for the next checkpoint. An actor holds the GPUs the
device asks for (:class:`Cluster`); on the CPU, as many CPUs as this process computes with, so
that its sums run in the same order. Each actor holds a
:class:`~circuit_tests.spec.session.CircuitSession` of its own, so a checkpoint is loaded once
across the cluster and its subjects are shared by its specs, exactly as in one process. What comes
back is what an in-process check gives: the :class:`Verdict` (figures as plain data), the baseline
entries it recorded (:meth:`BaselineStore.pending`, as pytest-xdist workers hand them over) and the
baseline key it tested. Only the client writes baselines and reports.

Specs travel with the task (a parsed spec carries its examples), and so does the spec's stored
baseline file as the client read it. Checkpoints are read where they are, so every node must see
the same paths (a shared filesystem, or the same hub cache), and the directory the run started
in, where names given on the command line are read.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from circuit_tests.errors import BadOptionError, CircuitTestsError
from circuit_tests.model.loading import cache_dir, deterministic_cuda
from circuit_tests.spec.baselines import BaselineStore
from circuit_tests.spec.schema import Expectation, Spec

LOCAL = "local"  # --circuit-ray with no address: start a new Ray instance on this machine (Ray's own word for it)
TOKEN = "RAY_AUTH_TOKEN"  # a local instance's token lives in the environment, never in ~/.ray
PROBE = 10  # seconds between checks that the cluster still answers, while a result is awaited
SOCKETS = 40  # Ray's socket paths (<temp dir>/session_<time>_<pid>/sockets/...) must fit in 107 bytes


@dataclass(frozen=True)
class Cluster:
    """Where to measure: a Ray address (:data:`LOCAL`: start one here), and the GPUs each checkpoint's actor holds."""

    address: str
    gpus: float


def cluster(address: str, device: str, gpus: float | None) -> Cluster:
    """The cluster a run asked for, its GPUs per actor checked against the device: none on the CPU, at most one for
    ``cuda`` (a fraction shares a GPU between small checkpoints), and as many as the model is sharded over for ``auto``."""
    if device == "cpu":
        if gpus:
            raise BadOptionError(f"--circuit-ray-gpus {gpus:g} asks for GPUs on --circuit-device cpu; give --circuit-device "
                                 "cuda (one GPU per checkpoint) or auto (sharded over several).")
        return Cluster(address, 0)
    if device == "auto":
        if gpus is None or gpus < 1:
            raise BadOptionError("--circuit-device auto on a Ray cluster shards each checkpoint over the GPUs its actor "
                                 "holds: say how many with --circuit-ray-gpus N (N >= 1).")
        return Cluster(address, gpus)
    if gpus is not None and not 0 < gpus <= 1:
        raise BadOptionError(f"--circuit-ray-gpus {gpus:g} with --circuit-device {device}: one GPU or a share of one "
                             "(0 < N <= 1); to shard a checkpoint over several GPUs, give --circuit-device auto.")
    return Cluster(address, 1 if gpus is None else gpus)


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

    def __init__(self, options, directory: str, threads: int) -> None:
        from circuit_tests.spec.session import CircuitSession

        os.chdir(directory)  # names given on the command line are read as the client reads them
        torch.set_num_threads(threads)  # as many as the actor holds CPUs: on the CPU, the same sums as the client's
        device = options.load.device
        if device != "cpu":
            deterministic_cuda()
        load = replace(options.load, device="cuda" if device.startswith("cuda:") else device)  # Ray picks the GPUs
        self.session = CircuitSession(replace(options, load=load, html=None, json=None, summary=None, ray=None))

    def check(self, work: Work, stored: dict) -> tuple:
        self.session.baselines = BaselineStore(self.session.baselines.update)
        self.session.baselines.preload(stored)
        verdict = self.session.check(work.spec, work.model, work.expectation, work.from_command_line)
        tested = sorted((str(path), key) for path, key in self.session.tested)
        return verdict, self.session.baselines.pending(), tested


def _ray():
    try:
        import ray
    except ImportError:
        raise BadOptionError("--circuit-ray needs Ray: pip install 'circuit-tests[ray]'") from None
    return ray


class RayRun:
    """The client's side: actors per checkpoint, futures per item, results taken in item order."""

    def __init__(self, where: Cluster) -> None:
        self.ray = _ray()
        self.where = where
        self.started = not self.ray.is_initialized()
        self.token = os.environ.get(TOKEN)
        if self.started:
            self._connect()
        self.futures: dict[tuple[Path, str, str], object] = {}
        self.actors: dict[str, object] = {}
        self.lost: str | None = None  # why the cluster cannot be reached any more

    def _connect(self) -> None:
        """Join the cluster at the address, or start a local instance whose files stay in the cache."""
        address = self.where.address
        if ":" in address and not _answers(address):  # Ray itself would wait minutes for an address that is not there
            raise _unreachable(address, "nothing answers there")
        try:
            if address == LOCAL:
                os.environ.setdefault(TOKEN, secrets.token_hex(32))
                self.ray.init(address=LOCAL, include_dashboard=False, log_to_driver=False, _temp_dir=str(_temp_dir()))
            else:
                self.ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except CircuitTestsError:
            raise
        except Exception as error:  # noqa: BLE001 -- any failure to reach the cluster is the run's failure, said once
            raise _unreachable(address, f"{type(error).__name__}: {_cause(error)}") from None

    def submit(self, options, works: Sequence[Work], baselines: BaselineStore) -> None:
        """Start an actor per checkpoint, send each its work in order, then ask it to end once that is done."""
        cpus = self._cpus()
        actor = self.ray.remote(num_gpus=self.where.gpus, num_cpus=cpus, max_restarts=0)(CheckpointWorker)
        for work in works:
            if work.model not in self.actors:
                self.actors[work.model] = actor.remote(options, os.getcwd(), cpus)
            self.futures[work.key] = self.actors[work.model].check.remote(work, baselines.copy_for(work.spec))
        for handle in self.actors.values():
            handle.__ray_terminate__.remote()  # runs after the checks sent before it

    def _cpus(self) -> int:
        """CPUs per actor: one beside a GPU; on the CPU, the threads this process computes with (so that a local run
        sums in the same order and gives the same figures as one process), at most the largest node's CPUs."""
        if self.where.gpus:
            return 1
        largest = max((node["Resources"].get("CPU", 0) for node in self.ray.nodes() if node["Alive"]), default=1)
        return max(1, min(torch.get_num_threads(), int(largest)))

    def result(self, work: Work) -> tuple:
        """The (verdict, pending baselines, tested keys) of submitted work. An actor that died fails its checkpoint's
        items only; a cluster that cannot be reached any more fails every item still to come."""
        future = self.futures.pop(work.key, None)
        if future is None:
            raise CircuitTestsError(f"{work.spec.path}: {work.model}: {work.expectation.label} was not sent to the cluster.")
        if self.lost:
            raise CircuitTestsError(self.lost)
        try:
            found = self._wait(future)
        except self.ray.exceptions.RayActorError as error:
            if self._reachable():
                raise CircuitTestsError(f"{work.spec.path}: {work.model}: the Ray actor measuring this checkpoint died "
                                        f"({_cause(error)}); every item of this checkpoint fails, the others go on.") from None
            found = None
        if found is None:
            self.lost = (f"--circuit-ray {self.where.address}: the connection to the Ray cluster was lost (its control "
                         "store does not answer). This item and every one after it fail; baselines measured before are "
                         "kept. Check the cluster (`ray status`) and run again.")
            raise CircuitTestsError(self.lost)
        return found

    def _wait(self, future) -> tuple | None:
        """The future's value, waited for as long as it takes while the cluster answers; None once it does not."""
        while True:
            try:
                return self.ray.get(future, timeout=PROBE)
            except self.ray.exceptions.GetTimeoutError:
                if not self._reachable():
                    return None

    def _reachable(self) -> bool:
        """Whether the cluster's control store still answers (a dead actor on a live cluster is that actor's loss)."""
        return _answers(self.ray.get_runtime_context().gcs_address)

    def shutdown(self) -> None:
        """End every actor still running; disconnect, and stop a local instance, if this run started Ray."""
        if not self.lost:
            for handle in self.actors.values():
                self.ray.kill(handle)
        self.actors.clear()
        if self.started or self.lost:
            self.ray.shutdown()
        if self.token is None:
            os.environ.pop(TOKEN, None)


def _temp_dir() -> Path:
    """A local instance's sockets and logs, in the cache, or refused where its path would be too long for a socket."""
    path = cache_dir() / "ray"
    if len(str(path)) > SOCKETS:
        raise BadOptionError(f"--circuit-ray: a local Ray instance keeps its sockets in {path}, a path too long for a "
                             f"socket ({len(str(path))} characters; at most {SOCKETS}). Point CIRCUIT_TESTS_CACHE at a "
                             "shorter directory, or start Ray yourself (`ray start --head`) and give --circuit-ray=auto.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _answers(address: str) -> bool:
    """Whether something accepts a connection at ``host:port`` within :data:`PROBE` seconds."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE).close()
    except (OSError, ValueError):
        return False
    return True


def _unreachable(address: str, cause: str) -> BadOptionError:
    """The usage error for a cluster that could not be reached at ``address``, and how to get one."""
    return BadOptionError(f"--circuit-ray {address}: could not reach the Ray cluster ({cause}). Start one with `ray start "
                          "--head`, or give its address (host:port, or auto for the one `ray start` started here); to join a "
                          "cluster with token authentication, set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN).")


def _cause(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
