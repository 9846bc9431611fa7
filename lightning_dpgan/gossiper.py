"""``Gossiper``: one replica's side of decentralized training, shared by the Trainer and the Fabric strategy.

Both strategies do the same around an optimizer step: align the replicas once (rank 0's weights, then a random
stream per rank), mix every optimizer step (anchors through the optimizer's anchor hook, or parameters after the
step), watch for non-finite values and SIGTERM, agree on a stop through the gossip, and write and read checkpoint
sets. Only how Lightning or Fabric call them differs, which stays in :mod:`lightning_dpgan.strategy` and
:mod:`lightning_dpgan.fabric`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_dpgan.checks import check_bool, check_choice, check_int
from lightning_dpgan.gossip import GossipEngine, GossipOptions, GossipPeerError, Stop, StopReason, Transport
from lightning_dpgan.gossip.live import LiveGossip, MembershipError
from lightning_dpgan.gossip.membership import Membership
from lightning_dpgan.gossip.registry import engine_class
from lightning_dpgan.gossip.transport import peer_failure
from lightning_dpgan.guard import NonFiniteError, first_nonfinite, nonfinite_message
from lightning_dpgan.mix_sets import AnchoredOptimizer, MixSet, build_mix_set, metric_prefixes, own_buffers, own_parameters, submodule_names
from lightning_dpgan.replicas import (
    CHECKPOINT_KEY,
    CheckpointError,
    ReplicaSet,
    check_free_key,
    main_meta,
    read_replica,
    remove_other_sets,
    remove_set,
    replica_own,
    replica_path,
    replica_set_of,
    write_replica,
)
from lightning_dpgan.seeding import seed_for_rank
from lightning_dpgan.topology import TOPOLOGIES, Topology, TopologyError, build_topology, rebuild

log = logging.getLogger(__name__)

#: a replica file's entry for what its gossip engine alone holds (CHOCO's public copies)
GOSSIP_REPLICA_KEY = "gossip_replica"


class Collectives(Protocol):
    """What a checkpoint set needs of the strategy: Lightning's and Fabric's strategies both have these."""

    global_rank: int
    is_global_zero: bool

    def barrier(self, name: str | None = None) -> None: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor: ...


class Gossiper:
    """The replica side of a decentralized strategy. Arguments as :class:`~lightning_dpgan.DecentralizedStrategy`'s."""

    def __init__(
        self,
        topology: str | Topology,
        gossip: GossipOptions | Mapping[str, Any] | None,
        topology_options: Mapping[str, Any] | None,
        consensus_every: int,
        mix_buffers: bool,
    ) -> None:
        if not isinstance(topology, Topology):
            check_choice("topology", topology, TOPOLOGIES, error=TopologyError)
        self.options = GossipOptions.build(dict(gossip) if isinstance(gossip, Mapping) else gossip)
        self.consensus_every = check_int("consensus_every", consensus_every, 0)
        self.mix_buffers = check_bool("mix_buffers", mix_buffers)
        self.topology_spec = topology
        self.topology_options = dict(topology_options or {})
        self.topology: Topology | None = None
        self.engine: GossipEngine | None = None
        self.run_id = uuid.uuid4().hex[:12]
        #: latest consensus distance per top-level submodule, identical on every rank
        self.consensus_distance: dict[str, float] = {}
        #: the stop every rank took, once taken (a SIGTERM or a non-finite value)
        self.stopped: Stop | None = None
        self._module: nn.Module | None = None
        self._optimizers: list[Optimizer] = []
        self._mix_sets: dict[int, MixSet] = {}
        self._step_counts: dict[int, int] = {}
        self._hooks: list[RemovableHandle] = []
        self._signalled = False
        self._signal_announced = False
        self._nonfinite: tuple[int, int] | None = None  # (step, submodule) where this rank first saw one
        self._in_collective = False

    # ------------------------------------------------------------------ set-up
    def build_topology(self, world_size: int) -> Topology:
        """The graph, built and checked against the gossip variant once per world size (the CLI's checks, the
        launcher and ``connect`` all ask for it)."""
        if self.topology is None or self.topology.world_size != world_size:
            topology = build_topology(self.topology_spec, world_size, **self.topology_options)
            self.options.check_topology(topology)
            self.topology = topology
        return self.topology

    def connect(self, world_size: int, rank: int, transport: Transport) -> GossipEngine:
        topology = self.build_topology(world_size)
        self.engine = engine_class(self.options)(topology, rank, transport, self.options)  # topology checked there
        return self.engine

    def go_live(self, rank: int) -> None:
        """With ``membership="live"``: watch the members through the run's c10d store from now on (after
        :attr:`run_id` is shared: it scopes the store's keys)."""
        engine = self.engine
        if isinstance(engine, LiveGossip) and engine.world_size > 1:
            membership = Membership(self.run_id, rank, range(engine.world_size))
            if rank == 0:
                membership.publish()  # where a worker started later finds the run
            engine.go_live(membership, self._rebuild)

    def _rebuild(self, world_size: int) -> tuple[Topology, str | None]:
        return rebuild(self.topology_spec, world_size, **self.topology_options)

    def join(self) -> bytes:
        """This worker, started alone, joins the newest live run in the store at ``MASTER_ADDR:MASTER_PORT``: it is
        admitted at the members' next step, and receives a member's replica (serialized by that member's strategy:
        the strategy loads it, then :meth:`resume_gossip`)."""
        engine = self.engine
        if not isinstance(engine, LiveGossip) or engine.world_size != 1:
            raise ValueError(
                "joining a live run needs membership='live' and a worker started alone (one process: devices=1, "
                f"num_nodes=1), got membership={self.options.membership!r} and {engine.world_size if engine else 0} workers"
            )
        membership = Membership.join(self.options.startup_timeout)
        self.run_id = membership.scope  # the run's: it names the checkpoint sets this worker writes a replica of
        return engine.join(membership, self._rebuild)

    def gossip_state(self) -> dict[str, Any]:
        """What a joiner takes from its donor besides the replica: the engine's step, phase and changes, and the
        steps of each mixed optimizer (the consensus cadence)."""
        assert isinstance(self.engine, LiveGossip)
        return {"engine": self.engine.gossip_state(), "optimizer_steps": [self._step_counts.get(id(o), 0) for o in self._optimizers]}

    def resume_gossip(self, state: Mapping[str, Any]) -> None:
        assert isinstance(self.engine, LiveGossip)
        self.engine.resume(state["engine"])
        self._step_counts = {id(o): int(n) for o, n in zip(self._optimizers, state["optimizer_steps"])}

    @property
    def live_engine(self) -> LiveGossip | None:
        """The engine of a live run, whose members' group carries the framework's collectives
        (:attr:`LiveGossip.carries_collectives`)."""
        engine = self.engine
        return engine if isinstance(engine, LiveGossip) and engine.carries_collectives else None

    def align(self, module: nn.Module, rank: int) -> None:
        """Start every replica from rank 0's weights, then give each rank its own random stream."""
        assert self.engine is not None
        if self.engine.world_size == 1:
            return  # one replica: nothing to align, and the random stream is left as it is
        self.engine.broadcast([p.data for p in own_parameters(module)] + own_buffers(module), src=0)
        seed_for_rank(rank)  # replicas start alike but draw their own noise and batches

    def attach(self, module: nn.Module, optimizers: list[Optimizer]) -> None:
        """Mix these optimizers' steps from now on: anchored ones through their anchor hook."""
        self.detach()
        self._module, self._optimizers = module, list(optimizers)
        if len(self._optimizers) > 1 and (self.options.every > 1 or self.options.staleness):
            setting = f"every={self.options.every}" if self.options.every > 1 else f"staleness={self.options.staleness}"
            raise ValueError(
                f"{setting} counts the steps of one mixed optimizer; this module steps {len(self._optimizers)} "
                "(fuse the players into one optimizer, as DPGAN does, or leave every=1 and staleness=0)"
            )
        self._hooks = [o.register_anchor_hook(self._mix) for o in self._optimizers if isinstance(o, AnchoredOptimizer)]
        if isinstance(self.engine, LiveGossip):
            self.engine.per_batch = max(1, len(self._optimizers))  # each mixes once a training step
        self.stopped, self._nonfinite, self._signalled, self._signal_announced = None, None, False, False

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._mix_sets, self._step_counts = [], {}, {}

    # ------------------------------------------------------------------ around each optimizer step
    def after_step(self, optimizer: Optimizer, output: Any) -> tuple[dict[str, float], Stop | None]:
        """After ``optimizer.step()``: mix an optimizer without anchors, check the loss it returned, measure consensus
        every ``consensus_every`` steps. Returns the consensus just measured (per submodule; usually none) and the
        stop every rank takes after this step, once (a non-finite value raises :class:`NonFiniteError` instead)."""
        assert self.engine is not None
        mix_set = self._mix_set(optimizer)
        if not mix_set.anchored:
            self._mix(optimizer, mix_set.params)
        if isinstance(output, Tensor) and not bool(torch.isfinite(output.detach()).all()):
            self._announce_nonfinite(len(submodule_names(self._module)))  # "the loss"
        count = self._step_counts.get(id(optimizer), 0) + 1
        self._step_counts[id(optimizer)] = count
        consensus = {}
        if self.consensus_every and count % self.consensus_every == 0 and self.engine.world_size > 1:
            consensus = self._record_consensus(mix_set.state(optimizer), mix_set.group_ids)
        return consensus, self._due_stop()

    def skips_step(self) -> bool:
        """Whether the coming step should only mix (``catch_up``: a neighbour is waiting on this replica); then
        :meth:`catch_up` is the step."""
        return self.engine is not None and self.engine.skips_next_step()

    def catch_up(self, optimizer: Any) -> None:
        """A step without computation: the optimizer steps with no gradients, so an optimistic one keeps its
        anchors and directions, its anchor hook mixes the anchors and it extrapolates from them; any other optimizer
        leaves its parameters, which are then mixed. ``optimizer`` is what the framework steps (Lightning's or
        Fabric's wrapper), so the step is counted and stops are checked as for any other."""
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()

    def signal(self) -> None:
        """A SIGTERM arrived: announced with the next step's mix."""
        self._signalled = True

    def _due_stop(self) -> Stop | None:
        assert self.engine is not None
        stop = self.engine.due_stop()
        if stop is None or self.stopped is not None:
            return None
        self.stopped = stop
        if stop.reason == StopReason.NONFINITE:
            raise NonFiniteError(nonfinite_message(self.player(stop.detail), stop.origin_rank, stop.origin_step, stop.step))
        return stop

    def player(self, group: int) -> str:
        names = submodule_names(self._module) if self._module is not None else []
        return "the loss" if group >= len(names) else f"the {names[group]}"

    def _mix(self, optimizer: Optimizer, state: list[Tensor]) -> None:
        """Mix ``optimizer``'s state (with its buffers): its anchors, as its anchor hook, just updated and before it
        extrapolates from them; or its parameters after its step. The non-finite check and a SIGTERM's stop ride on
        the mix."""
        assert self.engine is not None
        mix_set = self._mix_set(optimizer)
        if self._nonfinite is None:
            bad = first_nonfinite(state)
            if bad is not None:
                self._announce_nonfinite(mix_set.group_ids[bad])
        if self._signalled and not self._signal_announced:
            self._signal_announced = True
            self.engine.announce_stop(StopReason.SIGNAL)
        self.engine.step(state + mix_set.buffers)

    def _announce_nonfinite(self, group: int) -> None:
        """Remember where this rank first saw a non-finite value (checkpoints ask), and announce the stop."""
        assert self.engine is not None
        if self._nonfinite is None:
            self._nonfinite = (self.engine.steps + 1, group)  # the step in progress, counted from 1
            self.engine.announce_stop(StopReason.NONFINITE, group)

    def _mix_set(self, optimizer: Optimizer) -> MixSet:
        cached = self._mix_sets.get(id(optimizer))
        if cached is not None and len(cached.params) == sum(len(g["params"]) for g in optimizer.param_groups):
            return cached
        assert self._module is not None
        mix_set = build_mix_set(self._module, optimizer, self._optimizers, self.mix_buffers)
        self._mix_sets[id(optimizer)] = mix_set
        return mix_set

    def _record_consensus(self, tensors: list[Tensor], group_ids: list[int]) -> dict[str, float]:
        assert self.engine is not None and self._module is not None
        names = submodule_names(self._module)
        values = self.engine.consensus_distance(tensors, group_ids, len(names))
        recorded = {names[gid]: float(values[gid]) for gid in sorted(set(group_ids))}
        self.consensus_distance.update(recorded)
        return recorded

    def measure_consensus(self, module: nn.Module) -> dict[str, float]:
        """Consensus distance of all parameters now, per top-level submodule (a collective: call on every rank)."""
        assert self.engine is not None
        self.engine.flush()
        names = submodule_names(module)
        params = list(module.named_parameters())
        values = self.engine.consensus_distance(
            [p for _, p in params], [names.index(n.split(".", 1)[0]) for n, _ in params], len(names)
        )
        return {name: float(values[i]) for i, name in enumerate(names[:-1])}

    # ------------------------------------------------------------------ checkpoints
    def consensus_state(self, module: nn.Module, state: dict[str, Any], collectives: Collectives) -> dict[str, Any]:
        """A module's state with its floating entries averaged over the replicas (a collective: every rank calls it).

        First every rank is here at the same step: if any of them has seen a non-finite value, they all stop now
        instead of writing it into a checkpoint."""
        assert self.engine is not None
        self.engine.flush()  # the optimizer states and replica files are read after this
        if self.deferred is not None:
            return state  # a member was lost in this checkpoint: it is not written (save_set)
        try:
            with self.giving_way():
                self._refuse_nonfinite(collectives)
                self._raise_deferred()
                if self.engine.world_size == 1:
                    return state
                metrics = metric_prefixes(module)
                keys = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not k.startswith(metrics)]
                return {**state, **dict(zip(keys, self.engine.average([state[k] for k in keys])))}
        except GossipPeerError as err:
            if not self.defer(err):
                raise
            return state

    # ------------------------------------------------------------------ a member lost between steps (live)
    def defer(self, err: GossipPeerError) -> bool:
        """In a live run, a worker lost during a checkpoint or another of the framework's collectives (or an agreement
        begun then): the checkpoint is not written, the survivors agree on the members at their next step (where
        every one of them meets the loss) and train on; returns whether it was deferred so, else the caller raises
        ``err`` (a fixed run ends on it)."""
        engine = self.engine
        if not isinstance(engine, LiveGossip) or engine.membership is None or isinstance(err, MembershipError):
            return False
        engine.defer(err)
        return True

    @property
    def deferred(self) -> GossipPeerError | None:
        """A loss (or an agreement begun) kept for the next step: until then the framework's collectives are this
        worker's own (:meth:`LiveGossip._collective`) and checkpoint sets are not written. A set rank 0 had already
        committed when the loss came is whole, though its members log it as not written."""
        engine = self.engine
        return engine.deferred if isinstance(engine, LiveGossip) else None

    def giving_way(self) -> contextlib.AbstractContextManager[None]:
        """In a live run, waits inside give way to an agreement of the members (:meth:`LiveGossip.giving_way`)."""
        engine = self.engine
        live = isinstance(engine, LiveGossip) and engine.membership is not None
        return engine.giving_way() if live else contextlib.nullcontext()  # type: ignore[union-attr]

    def _raise_deferred(self) -> None:
        """In a checkpoint set: a collective that a member gave up (a loss, an agreement) ends the set here, as every
        later collective until the next step is this worker's own."""
        if self.deferred is not None:
            raise self.deferred

    def _skips_checkpoint(self, filepath: _PATH) -> bool:
        """Whether a loss is kept for the next step (live): the checkpoint is then not written, and says so."""
        if self.deferred is None:
            return False
        self._say_not_written(filepath)
        return True

    def _checkpoint_lost(self, filepath: _PATH, err: GossipPeerError) -> None:
        """A checkpoint's collective failed: in a live run kept for the next step (the checkpoint not written),
        else raised."""
        if not self.defer(err):
            raise err
        self._say_not_written(filepath)

    def _say_not_written(self, filepath: _PATH) -> None:
        assert self.engine is not None and self.deferred is not None
        log.warning("checkpoint %s of step %d not written: %s; the members agree on who is left at the next step",
                    filepath, self.engine.steps, self.deferred)

    def _refuse_nonfinite(self, collectives: Collectives) -> None:
        assert self.engine is not None
        report = [-1, 0, 0, 0] if self._nonfinite is None else [self._nonfinite[0], collectives.global_rank, self._nonfinite[1], 1]
        tensor = torch.tensor(report, dtype=torch.long, device=_device(self._module))
        rows = collectives.all_gather(tensor).reshape(-1, 4).tolist() if self.engine.world_size > 1 else [report]
        announced = sorted(row for row in rows if row[3] == 1)
        if announced:
            origin_step, origin_rank, detail, _ = announced[0]
            self.stopped = Stop(self.engine.steps, origin_step, origin_rank, int(StopReason.NONFINITE), detail)
            raise NonFiniteError(nonfinite_message(self.player(detail), origin_rank, origin_step, self.engine.steps))

    def save_set(
        self,
        filepath: _PATH,
        step: int,
        checkpoint: dict[str, Any],
        replica: dict[str, Any],
        collectives: Collectives,
        write_main: Any,
        own: dict[str, Any] | None = None,
    ) -> None:
        """Commit ``checkpoint`` (the main file, by rank 0, through ``write_main(checkpoint)``) and each rank's
        ``replica`` as one set: replicas first, then the main file, then older sets of the same path go. ``own``: the
        strategy's entries of the replica, kept apart from the user's.

        Any rank's write may fail (a full disk): the ranks agree after each write, so that every rank raises the same
        :class:`CheckpointError`, the new set's files go, and the sets written before stay. In a live run a worker
        lost during it ends no one: the set is not written (rank 0 removes what it did not commit), and the members
        agree on who is left at their next step."""
        assert self.engine is not None
        if self._skips_checkpoint(filepath):
            return
        try:
            with self.giving_way():
                self._write_set(filepath, step, checkpoint, replica, collectives, write_main, own)
        except GossipPeerError as err:
            self._checkpoint_lost(filepath, err)

    def _write_set(self, filepath: _PATH, step: int, checkpoint: dict[str, Any], replica: dict[str, Any],
                   collectives: Collectives, write_main: Any, own: dict[str, Any] | None) -> None:
        assert self.engine is not None
        rank, is_zero, members = self.set_place(collectives)
        token = collectives.broadcast(uuid.uuid4().hex[:8] if is_zero else None)
        self._raise_deferred()
        replica_set = ReplicaSet(self.run_id, int(step), token, len(members), self.engine.topology.name, members)
        check_free_key(checkpoint, CHECKPOINT_KEY)
        checkpoint[CHECKPOINT_KEY] = main_meta(replica_set, self.engine.state_dict())
        own = {**(own or {}), GOSSIP_REPLICA_KEY: self.engine.replica_state()}
        undo = lambda: remove_set(filepath, replica_set, rank, is_zero)  # noqa: E731
        started, committed = time.monotonic(), False
        try:
            failure = _failure_of(lambda: write_replica(filepath, replica_set, rank, replica, own), replica_path(filepath, replica_set, rank))
            # every replica is on disk before the main file commits the set; the others may take as long to write theirs
            allowance = 2 * (time.monotonic() - started)
            self._agree("replicas written", failure, collectives, allowance, undo)
            self._raise_deferred()
            failure = _failure_of(lambda: write_main(checkpoint), filepath) if is_zero else None
            committed = is_zero and failure is None
            self._agree("checkpoint committed", failure, collectives, allowance, undo)  # only then may the older sets go
            self._raise_deferred()
        except GossipPeerError:
            # a worker lost during the agreements: rank 0 committed the set only if it heard every replica was
            # written (the lost one's too), so a committed set is whole; one it did not commit goes
            if is_zero and not committed:
                undo()
            raise
        remove_other_sets(filepath, replica_set, rank, is_zero)

    def set_place(self, collectives: Collectives) -> tuple[int, bool, tuple[int, ...]]:
        """This replica's rank in a checkpoint set, whether it writes the main file, and the set's members (ids): the
        global rank among every rank, or, once a live run's members changed, the rank among the current members (the
        lowest writes), so that a set of ``n`` replicas resumes on ``n`` workers, each taking its own."""
        live = self.live_engine
        if self.engine is None:
            return collectives.global_rank, collectives.is_global_zero, ()
        if live is not None:
            present = live.present
            return present.index(live.me), live.me == present[0], present
        return collectives.global_rank, collectives.is_global_zero, tuple(range(self.engine.world_size))

    def commit_main(self, filepath: _PATH, collectives: Collectives, write_main: Callable[[], None]) -> None:
        """Rank 0 (the lowest member) writes a main file without replicas; every rank learns whether it could."""
        if self._skips_checkpoint(filepath):
            return
        failure = _failure_of(write_main, filepath) if self.set_place(collectives)[1] else None
        try:
            with self.giving_way():
                self._agree("checkpoint written", failure, collectives, 0.0, lambda: None)
                self._raise_deferred()
        except GossipPeerError as err:
            self._checkpoint_lost(filepath, err)

    def _agree(self, what: str, failure: str | None, collectives: Collectives, allowance: float, undo: Callable[[], None]) -> None:
        """Every rank says whether its write failed; if any did, every rank undoes the new set and raises the first
        failing rank's :class:`CheckpointError`."""
        assert self.engine is not None
        if self.engine.world_size == 1:
            failed = [failure is not None]
        else:
            with self.collective(f"checkpoint ({what})", allowance):
                flag = torch.tensor([failure is not None], device=_device(self._module))
                failed = collectives.all_gather(flag).reshape(-1).tolist()
                if any(failed):
                    failure = collectives.broadcast(failure, src=self.set_place(collectives)[2][failed.index(True)])
        if any(failed):
            undo()
            raise CheckpointError(failure)

    @contextlib.contextmanager
    def collective(self, what: str, allowance: float = 0.0) -> Iterator[None]:
        """Around a collective of the framework's (a barrier, a broadcast, a gather): on gloo, bounded by the
        engine's timeout (the peer timeout after the warm-up) plus ``allowance`` seconds (what a write may take),
        and a failure raised as :class:`~lightning_dpgan.gossip.GossipPeerError` naming the worker that did not come.
        The outermost one bounds nested ones."""
        engine = self.engine
        if engine is None or engine.world_size == 1 or self._in_collective:
            yield
            return
        timeout = engine.collective_timeout + timedelta(seconds=allowance)
        self._in_collective = True
        bounded = _set_default_group_timeout(timeout)
        try:
            yield
        except GossipPeerError:
            raise
        except RuntimeError as err:
            if not _lost_a_peer(err):
                raise
            group = getattr(engine.transport, "group", None)
            raise peer_failure(engine.rank, what, None, timeout, engine.phase, err, group) from err
        finally:
            self._in_collective = False
            if bounded:
                _set_default_group_timeout(timedelta(seconds=self.options.startup_timeout))

    def read_own_replica(self, filepath: _PATH, checkpoint: dict[str, Any], collectives: Collectives) -> dict[str, Any] | None:
        """This rank's replica of the set the main file commits, or ``None`` for a main file without one or one written
        at another world size (every replica then starts from the consensus model). Any rank missing its replica, or
        holding one of another set, makes every rank raise :class:`CheckpointError` naming the ranks."""
        assert self.engine is not None
        replica_set = replica_set_of(checkpoint)
        if replica_set is None or replica_set.world_size != self.engine.world_size:
            return None
        replica, error = None, None
        try:
            replica = read_replica(filepath, replica_set, collectives.global_rank)
        except CheckpointError as err:
            error = str(err)
        failed = [False] if self.engine.world_size == 1 else collectives.all_gather(
            torch.tensor([error is not None], device=_device(self._module))
        ).reshape(-1).tolist()
        if any(failed) or error is not None:
            ranks = ", ".join(str(r) for r, bad in enumerate(failed) if bad) or str(collectives.global_rank)
            name = str(filepath).rstrip("/").rsplit("/", 1)[-1]
            raise CheckpointError(
                f"cannot resume every replica from {str(filepath)!r}: the replica files of rank(s) {ranks} are missing "
                f"or belong to another checkpoint{f' ({error})' if error else ''}. Copy the checkpoint's {name}.replicas "
                f"folder with it, or start a new fit from its consensus model"
            )
        self.engine.load_state_dict(checkpoint[CHECKPOINT_KEY]["gossip"])
        assert self.topology is not None
        # CHOCO's copies belong to particular neighbours: the graph itself must match, not its name (a torus of
        # another shape, a random_regular of another seed keep theirs). Every rank reads the same main file, so all
        # refuse alike. A checkpoint from before graphs were recorded cannot tell: its copies start afresh
        gossip_replica = replica_own(replica).get(GOSSIP_REPLICA_KEY, {})
        graph = checkpoint[CHECKPOINT_KEY]["gossip"].get("graph")
        if self.options.compression is not None and gossip_replica.get("choco_copies") and graph != self.topology.fingerprint():
            if graph is not None:
                raise CheckpointError(
                    f"cannot resume the CHOCO copies of {str(filepath)!r}: they were written on topology "
                    f"{replica_set.topology!r} (graph {graph}, {replica_set.world_size} workers), and this run's "
                    f"{self.topology.name!r} is another graph ({self.topology.fingerprint()}); resume with the same "
                    "topology and options, or start a new fit from the checkpoint's consensus model"
                )
            gossip_replica = {}
        self.engine.load_replica_state(gossip_replica)
        return replica


def point_anchors_at_parameters(optimizers: list[Optimizer]) -> None:
    """After restoring a consensus model into optimizers whose state came from another replica: their anchors
    become the (consensus) parameters."""
    for optimizer in optimizers:
        if isinstance(optimizer, AnchoredOptimizer):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            with torch.no_grad():
                for anchor, param in zip(optimizer.anchors(), params):
                    anchor.copy_(param)


def _failure_of(write: Callable[[], None], path: _PATH) -> str | None:
    """Run a checkpoint write; what went wrong, in one line, or ``None``. Never raises: the other ranks wait to hear."""
    try:
        write()
    except CheckpointError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - a storage plugin's error, say; every rank must hear of it
        lines = str(err).strip().splitlines()
        return f"checkpoint file {os.fspath(path)!r} could not be written ({type(err).__name__}: {lines[0] if lines else ''})"
    return None


def _lost_a_peer(err: RuntimeError) -> bool:
    """Whether a collective failed on a peer (gloo: a timeout, a closed connection), not on its arguments."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(word in text for word in ("gloo", "timed out", "timeout", "connection", "closed"))


def _set_default_group_timeout(timeout: timedelta) -> bool:
    """Bound the next collectives of the default process group, where it is gloo's (NCCL's timeout aborts the
    process instead). Returns whether it did."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_backend() != "gloo":
        return False
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.8
    setter(timeout)
    return True


def _device(module: nn.Module | None) -> torch.device:
    parameter = next(module.parameters(), None) if module is not None else None
    return parameter.device if parameter is not None else torch.device("cpu")
