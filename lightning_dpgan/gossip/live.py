"""``LiveGossip``: synchronous DPOSG whose members may leave while it runs (``GossipOptions(membership="live")``).

Each step is :class:`~lightning_dpgan.gossip.synchronous.SynchronousGossip`'s. When a wait fails, because a
neighbour died, stayed silent past the peer timeout, or another worker opened a new generation, the worker takes
part in the agreement (:class:`~lightning_dpgan.gossip.membership.Membership`) and recovers from there:

* A worker completes a mix only once each neighbour has sent it its message, so live neighbours are never more than
  one mix apart; a survivor ``d`` hops from the worker that left may be ``d - 1`` mixes ahead of its neighbours. The
  change step ``c`` is one past the furthest any survivor got.
* Every mix ``m < c`` that a survivor had not completed, it completes with ``W_fold``: the old matrix restricted to
  the survivors, each lost neighbour's weight on the diagonal (:func:`~lightning_dpgan.topology.fold`), training on
  between them as usual. A survivor that had completed ``m`` had no lost neighbour then, so it used exactly its
  ``W_fold`` row: every mix from the departure to ``c - 1`` is ``W_fold`` on every survivor (symmetric, hence doubly
  stochastic; the survivors' average is kept). A neighbour one mix ahead sends its previous message again right
  after the change (each worker keeps it: one copy of the mixed tensors more); the others send theirs when they get
  to that mix (:meth:`LiveGossip._fold_mix`).
* From mix ``c`` on every survivor mixes with the graph of the same family rebuilt for the survivors, on the
  generation's own gloo group.

A worker started later joins the same way (:meth:`LiveGossip.join`): its request opens a generation, nobody has
left, so ``W_fold`` is the old ``W`` and the joiner's row the identity until the change step, which is then the first
mix of a training step. At that step boundary its donor (its neighbour with the highest id) sends it the whole
replica, as the strategy serializes it (:meth:`LiveGossip.donate`); the joiner starts from it at the change step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpgan.gossip.buffers import Plan
from lightning_dpgan.gossip.membership import Generation, LiveTransport, Membership, MembershipChange, PeerLost
from lightning_dpgan.gossip.options import GossipOptions
from lightning_dpgan.gossip.synchronous import SynchronousGossip
from lightning_dpgan.gossip.transport import GossipPeerError, Transport, _first_line
from lightning_dpgan.topology import Topology, fold

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class MembershipError(GossipPeerError):
    """This worker cannot go on with the members: it was left out of them (it was silent past the peer timeout), or
    their group could not be built though every one of them is alive."""


#: the tag of the messages of the mixes begun before a change (:meth:`LiveGossip._fold_mix`)
_RESYNC_TAG = 7
#: the tag of a donor's replica sent to a worker that joins (:meth:`LiveGossip.donate`)
_JOIN_TAG = 8


@dataclass(frozen=True)
class Change:
    """One change of members: at mix ``step`` (the first on the new graph), ``left`` (ids) had left and ``joined``
    joined, making ``members`` on ``topology`` (``fallback``: why a ring, where the family did not fit)."""

    step: int
    left: tuple[int, ...]
    members: tuple[int, ...]
    topology: str
    fallback: str | None = None
    joined: tuple[int, ...] = ()

    def describe(self) -> str:
        what = [f"worker(s) {', '.join(map(str, ids))} {verb}" for ids, verb in ((self.left, "left"), (self.joined, "joined")) if ids]
        ring = f" (a ring: {self.fallback})" if self.fallback else ""
        members = ", ".join(map(str, self.members))
        return f"step {self.step}: {' and '.join(what)}; {len(self.members)} go on ({members}) on {self.topology}{ring}"


def donor(generation: Generation, topology: Topology, joiner: int) -> int:
    """The member (id) that sends ``joiner`` its replica: its neighbour on the new graph with the highest id, or the
    highest member where none of its neighbours was a member before. Not the lowest: worker 0 holds the run's store
    and writes its logs, and may not leave (docs/guide.md)."""
    before = [m for m in generation.members if m not in generation.joined]
    row = topology.matrix(0)[generation.members.index(joiner)]
    neighbours = [generation.members[j] for j in np.flatnonzero(row > 0) if generation.members[j] in before]
    return max(neighbours or before)


class LiveGossip(SynchronousGossip):
    """Synchronous gossip that goes on without a worker that left (see the module's docstring)."""

    def __init__(self, topology: Topology, rank: int, transport: Transport, options: GossipOptions) -> None:
        super().__init__(topology, rank, transport, options)
        self.me = rank  # this worker's id: its rank at the start
        self.membership: Membership | None = None
        self.changes: list[Change] = []
        self._rebuild: Callable[[int], tuple[Topology, str | None]] | None = None
        self._kept: tuple[list[Tensor], list[Tensor]] | None = None  # (this step's tensors, the previous step's)
        self._abandoned: list[Transport] = []
        self._failure: GossipPeerError | None = None  # a collective that failed between steps: agree at the next one
        self._catching_up: tuple[np.ndarray, Generation] | None = None  # (W_fold, the generation) until its change step
        #: the mixes of one training step (one per mixed optimizer; the gossiper sets it): where a join may begin
        self.per_batch = 1
        self._donate: tuple[int, list[int]] | None = None  # (the change step, the joiners' ranks) this worker sends to
        self._joining = False  # admitted, before its first step: the framework's start-up collectives stay its own
        self._donor = -1  # a joiner's donor (id)
        #: until its joiners' change step, the framework's collectives go over the members already there: (their
        #: group's transport, their ids); a joiner only comes to the members' group at its first step
        self._before_joiners: tuple[LiveTransport, tuple[int, ...]] | None = None
        self._stepping = False  # from the first step on, the framework's collectives give way to an agreement
        self._recovering = False  # in a step, a consensus measurement or a checkpoint, which give way to an agreement

    @property
    def members(self) -> tuple[int, ...]:
        return self.membership.generation.members if self.membership is not None else tuple(range(self.world_size))

    @property
    def carries_collectives(self) -> bool:
        """Whether the framework's collectives go through the members' group: from :meth:`go_live` on, in every
        generation (the default process group holds a worker that left, or lacks one that joined, and its waits
        cannot give way to an agreement). A joiner's framework starts up alone (its collectives its own) until its
        first step."""
        return self.membership is not None and not self._joining

    @contextlib.contextmanager
    def giving_way(self) -> Iterator[None]:
        """Waits inside give way to an agreement of the members (a :class:`MembershipChange`): for work that can be
        dropped or redone when the members change (a step's mix, a consensus measurement, a checkpoint)."""
        outer, self._recovering = self._recovering, True
        try:
            yield
        finally:
            self._recovering = outer

    def go_live(self, membership: Membership, rebuild: Callable[[int], tuple[Topology, str | None]]) -> None:
        """Watch the members from now on; ``rebuild(n)`` is the graph of the run's family for ``n`` workers."""
        group = getattr(self.transport, "group", None)  # generation 0: the gossip's own group over every rank
        self.membership, self._rebuild = membership, rebuild
        self.transport = LiveTransport(self.rank, group, self.options.chunk_bytes, self._interrupted, self.timeout.seconds)

    def _interrupted(self) -> bool:
        """Whether a wait should give way to an agreement: only inside :meth:`giving_way` (a step, a consensus
        measurement, a checkpoint), which recover from one; elsewhere (the initial broadcast, the framework's other
        collectives, a donation) the wait goes on, and the agreement waits for this worker's next step."""
        return self._recovering and self.membership is not None and self.membership.changing.is_set()

    # ------------------------------------------------------------------ the step
    @override
    def step(self, tensors: Sequence[Tensor]) -> None:
        self._joining = False
        self._stepping = True
        self._begin_step()
        if not self.mixes_now():
            return
        if self.membership is None:
            self.mix(tensors)
            return
        self._keep(tensors)
        with self.giving_way():
            self._step_recovering(tensors)

    def _step_recovering(self, tensors: Sequence[Tensor]) -> None:
        phase, failure, self._failure = self.phase, self._failure, None
        while True:
            try:
                if failure is not None and self._change(failure, tensors):
                    return  # this step's mix was finished with W_fold
                if self._catching_up is not None and self.steps < self._catching_up[1].change_step:
                    self._fold_mix(tensors)  # a mix begun before the change: W_fold, as every survivor does it
                else:
                    self._catching_up = None
                    self._joiners_arrived()
                    self.mix(tensors)
                return
            except MembershipError:
                raise
            except GossipPeerError as err:  # a neighbour lost, or another worker lost one: agree again
                self.phase, failure = phase, err
                self._restore(tensors)

    def _keep(self, tensors: Sequence[Tensor]) -> None:
        """Keep this mix's tensors before they are mixed, and the previous mix's: what the neighbours may need again
        after a change. The copy of two mixes ago is reused where it has the same shapes (one fused optimizer; two
        alternating ones, whose mixes alternate too)."""
        previous, older = self._kept if self._kept is not None else (None, None)
        if older is None or [t.shape for t in older] != [t.shape for t in tensors] or [t.dtype for t in older] != [t.dtype for t in tensors]:
            older = [t.detach().clone() for t in tensors]
        else:
            torch._foreach_copy_(older, [t.detach() for t in tensors])
        self._kept = (older, previous if previous is not None else [t.detach().clone() for t in tensors])

    def _restore(self, tensors: Sequence[Tensor]) -> None:
        assert self._kept is not None
        with torch.no_grad():
            torch._foreach_copy_(list(tensors), self._kept[0])
        self._plans.clear()

    @override
    def close(self) -> None:
        super().close()
        self._leave()

    @override
    def forget(self) -> None:
        super().forget()
        self._leave()  # a fit stopped by a signal or an error ends here, without close

    def _leave(self) -> None:
        """The fit is over: stop watching the members and end the transports' waiting threads, so that none is
        inside a call into torch when the interpreter exits."""
        if self.membership is not None:
            self.membership.close()
        for transport in (*self._abandoned, self.transport):
            if isinstance(transport, LiveTransport):
                transport.close()

    @override
    def consensus_distance(self, tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
        """As every engine's; where a worker left during it, or since the last step, NaN, and the members are agreed
        on at the next step."""
        unmeasured = torch.full((num_groups,), float("nan"), dtype=torch.float64)
        if self._failure is not None or self._before_joiners is not None:
            return unmeasured  # a loss to agree on first, or a joiner on its way: the gossip's group is not whole
        try:
            with self.giving_way():
                return super().consensus_distance(tensors, group_ids, num_groups)
        except MembershipError:
            raise
        except GossipPeerError as err:
            if self.membership is None:
                raise
            log.warning("worker %d: consensus not measured at step %d (%s); agreeing on the members at the next step", self.me, self.steps, err)
            self.defer(err)
            return unmeasured

    def defer(self, err: GossipPeerError) -> None:
        """A worker was lost between steps (in a checkpoint, a consensus measurement, one of the framework's
        collectives), or another member gave one up: the members agree at the next step, where every survivor meets
        it."""
        if self._failure is None:
            self._failure = err
            log.warning("worker %d: %s; the framework's collectives are this worker's own until the members agree at "
                        "the next step", self.me, err)

    @property
    def deferred(self) -> GossipPeerError | None:
        """The loss :meth:`defer` keeps for the next step's agreement, if any."""
        return self._failure

    # ------------------------------------------------------------------ a change of members
    def _change(self, err: GossipPeerError, tensors: Sequence[Tensor]) -> bool:
        """Agree on the members after ``err``, move to their group and graph, and finish the mix under way where
        this worker is behind. Returns whether this step's mix is done."""
        assert self.membership is not None and self._rebuild is not None
        old_members, old_w = self.members, self.topology.matrix(0)
        dead = ()
        if isinstance(err, PeerLost) and err.closed and err.peer is not None:
            dead = (old_members[err.peer],)  # its connection closed: the process is gone, no need to wait for silence
        if not isinstance(err, MembershipChange):
            log.warning("worker %d: %s; agreeing on the members again", self.me, err)
        old_transport = self.transport
        assert isinstance(old_transport, LiveTransport)
        generation, group = self._agree(self.steps - 1, dead, old_transport)
        left = tuple(m for m in old_members if m not in generation.members)
        topology, fallback = self._rebuild(len(generation.members))
        self._enter(generation, group, topology)
        keep = [old_members.index(m) for m in generation.members if m in old_members]
        w_fold = np.eye(len(generation.members))  # a joiner's row: the identity, until the change step
        w_fold[: len(keep), : len(keep)] = fold(old_w, keep)  # joiners come last: their ids are the newest
        self._catching_up = (w_fold, generation)
        joiners = [generation.members.index(j) for j in generation.joined if donor(generation, topology, j) == self.me]
        self._donate = (generation.change_step, joiners) if joiners else None
        self._joiners_arrived()
        if generation.joined and self.me not in generation.joined:
            present = tuple(m for m in generation.members if m not in generation.joined)
            group = self.membership.group(generation, self.timeout.seconds(), present)
            transport = LiveTransport(present.index(self.me), group, self.options.chunk_bytes, self._interrupted, self.timeout.seconds)
            self._before_joiners = (transport, present)
        done = self._resend(tensors)
        self._abandoned.append(old_transport)  # its watcher threads end on the works it failed: kept until then
        if not left and not generation.joined:  # a wait timed out on a worker that was only slow: a group of their own
            log.warning(
                "worker %d: nobody left; the same %d members go on from mix %d", self.me, len(generation.members), generation.change_step
            )
            return done
        change = Change(generation.change_step, left, generation.members, topology.name, fallback, generation.joined)
        self.changes.append(change)
        log.warning("worker %d: membership %s", self.me, change.describe())
        return done

    def _enter(self, generation: Generation, group: Any, topology: Topology) -> None:
        """Mix on ``generation``'s group and ``topology`` from now on, at this worker's rank among its members."""
        assert self.membership is not None
        self.rank = generation.members.index(self.me)
        self.topology = topology
        self.transport = LiveTransport(
            self.rank, group, self.options.chunk_bytes, self._interrupted, self.timeout.seconds
        )
        self._neighbours = [topology.neighbours(self.rank, p) for p in range(topology.period)]
        self._weights.clear()
        self._gathered_headers.clear()
        self._plans.clear()

    def _agree(self, completed: int, dead: Sequence[int], old_transport: LiveTransport) -> tuple[Generation, Any]:
        """The next member set and its group. A member that dies after the set is fixed and before the group is
        built makes the build fail within the peer timeout; the others then agree again, without it (silent by
        then). No mix is done in between, so the fold is still taken from the last graph mixed on. The same members
        failing twice (all alive) is an error."""
        assert self.membership is not None
        failed: tuple[int, ...] = ()
        while True:
            generation = self.membership.agree(completed, dead, self.timeout.seconds(), self.per_batch)
            if self.me not in generation.members:
                raise MembershipError(
                    f"worker {self.me} was left out of the members agreed on at mix {generation.change_step} (it was "
                    "silent past the peer timeout)"
                )
            old_transport.abandon()  # every member has stopped using it: nothing of it stays pending
            try:
                return generation, self.membership.group(generation, self.timeout.seconds())
            except RuntimeError as err:  # torch.distributed's errors: a member of the set never came
                if generation.members == failed:  # every member is alive, and the group still cannot be built
                    raise MembershipError(
                        f"worker {self.me}: the group of members {', '.join(map(str, failed))} could not be built "
                        f"twice: {_first_line(err)}"
                    ) from err
                failed = generation.members
                log.warning(
                    "worker %d: the group of members %s was not built (%s); agreeing on the members again",
                    self.me, ", ".join(map(str, generation.members)), _first_line(err),
                )
                dead = ()

    @torch.no_grad()
    def _resend(self, tensors: Sequence[Tensor]) -> bool:
        """Right after a change: send the neighbours one mix behind this worker its previous tensors (its message of
        the mix it completed last, which they have yet to complete); then, where this worker is behind the change
        step, do its mix under way now (:meth:`_fold_mix`). Returns whether this step's mix is done."""
        assert self._kept is not None and self._catching_up is not None
        w_fold, generation = self._catching_up
        mine = generation.completed[self.me]
        behind = [k for k, m in enumerate(generation.members) if w_fold[k, self.rank] > 0 and generation.completed[m] == mine - 1]
        posted = self._post_fold(Plan(self._kept[1]), behind, ())[0] if behind else []
        done = self.steps < generation.change_step
        if done:
            self._fold_mix(tensors)
        for batch in posted:
            for p in batch:
                self.transport.wait(p, self.timeout(), self.phase)
        return done

    @torch.no_grad()
    def _fold_mix(self, tensors: Sequence[Tensor]) -> None:
        """Mix ``m = steps`` with ``W_fold``, a mix begun before the change: this worker's tensors go to the neighbours
        that have not completed ``m``, and it takes from each neighbour its tensors of step ``m``, which a neighbour
        that had completed it sent right after the change (:meth:`_resend`)."""
        assert self._catching_up is not None
        w_fold, generation = self._catching_up
        m, members = self.steps, generation.members
        send_to = [k for k, member in enumerate(members) if k != self.rank and w_fold[k, self.rank] > 0 and generation.completed[member] < m]
        receive_from = [int(j) for j in np.flatnonzero(w_fold[self.rank] > 0) if j != self.rank]
        plan = Plan(list(tensors))
        posted, received = self._post_fold(plan, send_to, receive_from)
        for batch in posted:
            for p in batch:
                self.transport.wait(p, self.timeout(), self.phase)
        for b, bucket in enumerate(plan.buckets):
            bucket.flat.mul_(float(w_fold[self.rank, self.rank]))
            for j, row in zip(receive_from, received[b]):
                bucket.flat.add_(row, alpha=float(w_fold[self.rank, j]))
            bucket.unpack()
        self.phase += 1

    def _post_fold(self, plan: Plan, send_to: Sequence[int], receive_from: Sequence[int]) -> tuple[list[list[Any]], list[Tensor]]:
        """Post the plan's packed tensors to ``send_to`` and a receive of each bucket from ``receive_from``, on the
        tag of the mixes begun before the change (in step order between any two workers, as gloo keeps them)."""
        posted, received = [], []
        for bucket in plan.buckets:
            flat = bucket.pack()
            rows = torch.empty((len(receive_from), flat.numel()), dtype=flat.dtype, device=flat.device)
            posted.append(self.transport.exchange(flat, rows, send_to, receive_from, _RESYNC_TAG))
            received.append(rows)
        return posted, received

    # ------------------------------------------------------------------ a worker that joins
    def donation_due(self) -> bool:
        """Whether this worker sends its replica to a joiner now: at the step boundary before the change step."""
        return self._donate is not None and self.steps == self._donate[0] - 1

    def donate(self, replica: bytes) -> None:
        """Send ``replica`` (the whole state, serialized by the strategy) to each joiner this worker is the donor of:
        its length, then its bytes. A joiner lost meanwhile is left to the next mix, which finds it gone."""
        assert self._donate is not None
        step, joiners = self._donate
        self._donate = None
        data = torch.frombuffer(bytearray(replica), dtype=torch.uint8)
        for rank in joiners:
            try:
                for tensor in (torch.tensor([data.numel()], dtype=torch.long), data):
                    for posted in self.transport.exchange(tensor, None, (rank,), (), _JOIN_TAG):
                        self.transport.wait(posted, self.timeout(), self.phase)
            except GossipPeerError as err:
                log.warning("worker %d: the replica for the worker joining at step %d was not sent (%s)", self.me, step, err)
                continue
            log.warning("worker %d: sent its replica (%d bytes) to worker %d, which joins at step %d", self.me, data.numel(),
                        self.members[rank], step)

    def join(self, membership: Membership, rebuild: Callable[[int], tuple[Topology, str | None]]) -> bytes:
        """This worker, started alone, was admitted into a live run's members (:meth:`Membership.join`): build their
        group, take the run's graph for their number, and receive the donor's replica, returned as the donor's
        strategy serialized it. The strategy loads it, then :meth:`resume` the donor's gossip state."""
        generation = membership.generation
        self.membership, self._rebuild, self.me = membership, rebuild, membership.me
        topology, _ = rebuild(len(generation.members))
        self._enter(generation, membership.group(generation, self.options.startup_timeout), topology)
        self._donor = donor(generation, topology, self.me)
        source = generation.members.index(self._donor)
        wait = timedelta(seconds=self.options.startup_timeout)  # the members may be a few steps from the change
        try:
            size = torch.zeros((1, 1), dtype=torch.long)
            self._receive(size, source, wait)
            data = torch.empty((1, int(size)), dtype=torch.uint8)
            self._receive(data, source, wait)
        except GossipPeerError as err:  # the members go on without both; this worker may ask again
            self._leave()
            raise MembershipError(
                f"worker {self.me} could not join: its donor, worker {self._donor}, was lost before its replica arrived "
                f"({err}); start this worker again"
            ) from None
        self._joining = True
        return data.numpy().tobytes()

    def _receive(self, rows: Tensor, source: int, wait: timedelta) -> None:
        for posted in self.transport.exchange(None, rows, (), (source,), _JOIN_TAG):
            self.transport.wait(posted, wait, self.phase)

    def gossip_state(self) -> dict[str, Any]:
        """What a joiner takes from its donor besides the replica: the step and phase, and the changes so far."""
        return {**self.state_dict(), "changes": [dataclasses.asdict(change) for change in self.changes]}

    def resume(self, state: Mapping[str, Any]) -> None:
        """A joiner goes on from its donor's :meth:`gossip_state`."""
        self.load_state_dict(state)
        self.changes = [Change(**{k: tuple(v) if isinstance(v, list) else v for k, v in change.items()}) for change in state["changes"]]
        log.warning("worker %d: membership %s; started from worker %d's replica", self.me, self.changes[-1].describe(), self._donor)

    def summary(self) -> str:
        """The changes of members, in one line."""
        return "; ".join(change.describe() for change in self.changes) or "no change of members"

    def report(self) -> None:
        """The end of the run: the lowest member lists the changes."""
        if self.changes and self.me == self.members[0]:
            log.warning("membership changes in this run: %s", self.summary())

    # ------------------------------------------------------------------ the framework's collectives
    def _joiners_arrived(self) -> None:
        if self._before_joiners is not None:
            self._abandoned.append(self._before_joiners[0])
            self._before_joiners = None

    def _framework(self) -> tuple[LiveTransport, tuple[int, ...]]:
        """The transport and the members (ids) of the framework's collectives: the members' group, or before a
        joiner's change step the group of the members already there (the joiner waits for its replica)."""
        if self._before_joiners is not None:
            return self._before_joiners
        assert isinstance(self.transport, LiveTransport)
        return self.transport, self.members

    @property
    def present(self) -> tuple[int, ...]:
        """The members the framework's collectives, checkpoint sets and evaluations count: a joiner from its change
        step on."""
        return self._framework()[1]

    def _collective(self, run: Callable[[LiveTransport, tuple[int, ...]], _T], alone: Callable[[], _T]) -> _T:
        """One of the framework's collectives over the present members; where a member was lost since the last step
        (or is lost now, or the members are being agreed on again), ``alone()``: this worker's own value, as the
        group may hold a collective another member gave up, and the members agree at the next step."""
        if self._failure is not None:
            return alone()
        transport, present = self._framework()
        try:  # not before the first step: the initial broadcast comes after the start-up collectives, on the same group
            with self.giving_way() if self._stepping else contextlib.nullcontext():
                return run(transport, present)
        except MembershipError:
            raise
        except GossipPeerError as err:
            if isinstance(err, PeerLost) and err.peer is not None and present != self.members:  # a rank of the present
                err.peer = self.members.index(present[err.peer])  # members: the agreement takes the members' ranks
            self.defer(err)
            return alone()

    def barrier(self) -> None:
        self._collective(lambda transport, _: transport.wait(transport.all_reduce(torch.zeros(1)), self.collective_timeout, self.phase),
                         lambda: None)

    def all_gather_tensor(self, tensor: Tensor) -> Tensor:
        """Every present member's ``tensor``, stacked in member order (this worker's alone: one row)."""

        def gather(transport: LiveTransport, present: tuple[int, ...]) -> Tensor:
            out = torch.empty((len(present), *tensor.shape), dtype=tensor.dtype, device=tensor.device)
            transport.wait(transport.all_gather(out.view(-1), tensor.contiguous().view(-1)), self.collective_timeout, self.phase)
            return out

        return self._collective(gather, lambda: tensor.detach().clone().unsqueeze(0))

    def all_reduce_tensor(self, tensor: Tensor) -> tuple[Tensor, int]:
        """The sum of the present members' ``tensor`` and how many they are (this worker's alone: 1)."""

        def reduce(transport: LiveTransport, present: tuple[int, ...]) -> tuple[Tensor, int]:
            out = tensor.detach().clone()
            transport.wait(transport.all_reduce(out), self.collective_timeout, self.phase)
            return out, len(present)

        return self._collective(reduce, lambda: (tensor.detach().clone(), 1))

    @override
    @torch.no_grad()
    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """As every engine's, over the present members (a checkpoint's consensus model)."""
        if self._before_joiners is None:
            return super().average(tensors)
        out = []
        for t in tensors:
            total, count = self.all_reduce_tensor(t)
            out.append(total.div_(count))
        return out

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` of the worker whose id is ``src`` (the lowest present member's where that one left)."""

        def broadcast(transport: LiveTransport, present: tuple[int, ...]) -> Any:
            rank, root = present.index(self.me), present.index(src) if src in present else 0
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if rank == root else torch.empty(0, dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.long)
            transport.wait(transport.broadcast(size, root), self.collective_timeout, self.phase)
            if rank != root:
                data = torch.empty(int(size), dtype=torch.uint8)
            transport.wait(transport.broadcast(data, root), self.collective_timeout, self.phase)
            return obj if rank == root else pickle.loads(data.numpy().tobytes())

        return self._collective(broadcast, lambda: obj)
