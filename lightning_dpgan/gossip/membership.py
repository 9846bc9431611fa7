"""Live membership: who is in the run, agreed on through the c10d store, with a fresh gloo group per member set.

The engine and the reasons for it are in docs/membership.md. In short:

* every worker keeps a heartbeat in the run's c10d store (the one the launcher hosts at ``MASTER_ADDR:MASTER_PORT``),
  and a daemon thread watches for the next generation being opened (:class:`Membership`);
* a worker that loses a neighbour opens generation ``k + 1`` and writes how many mixes it has completed; the others
  see the key within a heartbeat, stop waiting (:class:`LiveTransport` raises :class:`MembershipChange`) and write
  theirs. Whoever first sees every old member either written, reported dead (its connection closed) or silent past
  the peer timeout fixes the member set with ``compare_set``: the store is the one authority, so every worker reads
  the same set (:meth:`Membership.agree`);
* each generation gets a ``ProcessGroupGloo`` of its own on ``PrefixStore("…/g{k}/pg/")``: the default group keeps
  its dead rank forever (:meth:`Membership.group`);
* a worker started later asks to join by writing its id under the next generation and opening it; the members
  agree as for a departure, and the set they fix holds it (:meth:`Membership.join`).

Ids are the workers' ranks at the start of the run, and then the start's size and up for the workers that join, in
the order they ask; a worker's rank in a generation is its index among the members, so the newest joiners come last.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._C._distributed_c10d import AllgatherOptions

from lightning_dpgan.gossip.transport import (
    DistributedTransport,
    GossipPeerError,
    Posted,
    _first_line,
    _Watcher,
    chunk_ranges,
    chunk_size,
    schedule,
)

#: how often a worker writes its heartbeat and looks for a new generation
HEARTBEAT_S = 0.1
#: how long a heartbeat must stand still, seen from here, before its own clock may call it silent (a live worker
#: whose clock runs behind is never dropped)
GRACE_S = 0.5
#: how often a waiting worker looks at its neighbours' messages and at the membership flag
POLL_S = 0.02
#: bound on one store operation (the store's host may be gone)
STORE_TIMEOUT_S = 30.0
#: the tag of the receive that ends an abandoned generation's group (:meth:`LiveTransport.abandon`): no message has it
_ABANDON_TAG = 0x7ABA
#: the tag of the sends that find which member a failed collective lost (:meth:`LiveTransport.lost_member`)
_PROBE_TAG = 0x7AB0
#: how long those sends have to fail
PROBE_S = 0.25
#: the store key, outside any run's scope, where the members of the newest live run say which it is (for joiners)
CURRENT_KEY = "lightning_dpgan/live/current"


class MembershipChange(GossipPeerError):
    """Another worker opened a new generation: stop waiting on this one's group and take part in the agreement."""


class PeerLost(GossipPeerError):
    """A wait on a neighbour (``peer``, its rank in the generation; ``None`` for a collective) failed: ``closed``
    when its connection was closed (the process died), not a timeout."""

    def __init__(self, message: str, peer: int | None, closed: bool) -> None:
        super().__init__(message)
        self.peer, self.closed = peer, closed


def _closed(err: BaseException) -> bool:
    text = str(err).lower()
    return not ("timed out" in text or "timeout" in text) and any(w in text for w in ("closed", "reset", "broken pipe", "eof"))


class LiveTransport(DistributedTransport):
    """:class:`DistributedTransport` on one generation's group, ranks being the generation's: operations go to the
    group object itself (a generation's group is not registered with ``torch.distributed``), every wait is done by a
    watcher thread per peer while this thread polls ``interrupted`` (a new generation opened elsewhere), and a failure
    is raised at once, naming the generation's peer, without the failure reports of a fixed run."""

    def __init__(
        self, rank: int, group: Any, chunk_bytes: int | None, interrupted: Callable[[], bool], timeout: Callable[[], float]
    ) -> None:
        super().__init__(rank, group, chunk_bytes)
        self.interrupted, self.timeout = interrupted, timeout
        self._waiters: dict[int, _Watcher] = {}
        self._probes: list[Any] = []  # sends nobody receives: kept referenced until the group is abandoned

    def _watched(self, works: list[Any], peer: int | None, what: str) -> Posted:
        posted = Posted(works, peer, what, arrived=threading.Event())
        key = -1 if peer is None else peer
        if key not in self._waiters:
            self._waiters[key] = _Watcher(f"live gossip waits on rank {peer}")
        self._waiters[key].watch(posted)
        return posted

    def exchange(
        self, send: Tensor | None, received: Tensor | None, send_to: Sequence[int], receive_from: Sequence[int], stream: int = 0
    ) -> list[Posted]:
        send_to = send_to if send is not None else ()
        receive_from = receive_from if received is not None else ()
        like = send if send is not None else received
        if like is None or (not send_to and not receive_from):
            return []
        row = {peer: k for k, peer in enumerate(receive_from)}
        chunking = chunk_size(like.device, self.chunk_bytes)
        ranges = chunk_ranges(like.shape[-1], None if chunking is None else max(1, chunking // like.element_size()))
        by_peer: dict[int, list[Any]] = {}
        for kind, peer, chunk in schedule(send_to, receive_from, len(ranges)):
            start, stop = ranges[chunk]
            try:
                if kind == "send":
                    work = self.group.send([send[start:stop]], peer, stream)  # type: ignore[index]
                else:
                    work = self.group.recv([received[row[peer], start:stop]], peer, stream)  # type: ignore[index]
            except Exception as err:  # noqa: BLE001 - gloo raises at the post when the peer's connection is already closed
                for posted_peer, works in by_peer.items():  # watched, as usual: kept referenced until they end
                    self._watched(works, posted_peer, "gossip exchange")
                raise PeerLost(f"rank {self.rank}: gossip exchange with rank {peer} failed: {_first_line(err)}", peer, _closed(err)) from None
            by_peer.setdefault(peer, []).append(work)
        return [self._watched(works, peer, "gossip exchange") for peer, works in by_peer.items()]

    def post_receive(self, received: Tensor, peer: int, stream: int = 0) -> Posted:
        (posted,) = self.exchange(None, received, (), (peer,), stream)
        return posted

    # Collectives run on the group's own threads, and say when they are done: they are polled here, with no thread of
    # ours waiting, and bounded by the peer timeout, so that one a departure leaves pending ends on its own.
    def _bounded(self, options: Any) -> Any:
        options.timeout = timedelta(seconds=self.timeout())
        return options

    def all_reduce(self, tensor: Tensor) -> Posted:
        return Posted([self.group.allreduce([tensor], self._bounded(dist.AllreduceOptions()))], None, "all_reduce")

    def all_gather(self, output: Tensor, tensor: Tensor) -> Posted:
        return Posted([self.group._allgather_base(output, tensor, self._bounded(AllgatherOptions()))], None, "all_gather")

    def broadcast(self, tensor: Tensor, src: int) -> Posted:
        options = self._bounded(dist.BroadcastOptions())
        options.rootRank = src
        return Posted([self.group.broadcast([tensor], options)], src, "broadcast")

    def wait(self, posted: Posted, timeout: timedelta | None, gossip_round: int) -> None:
        if posted.completed:
            return
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        collective = posted.arrived is None
        if collective:
            done = lambda wait: all(work.is_completed() for work in posted.works) or bool(time.sleep(wait))  # noqa: E731
        else:
            done = posted.arrived.wait  # type: ignore[union-attr]
        while not done(POLL_S):
            if self.interrupted():
                raise MembershipChange(f"rank {self.rank}: the members are being agreed on again")
            if deadline is not None and time.monotonic() > deadline:
                peer = None if collective else posted.peer  # which member of a collective is silent is not known
                who = "a peer" if peer is None else f"rank {peer}"
                raise PeerLost(f"rank {self.rank}: {posted.what} with {who} got nothing within {timeout}", peer, False)
        if collective:
            try:
                for work in posted.works:
                    work.wait()  # done: returns at once, or raises what failed
            except Exception as err:  # noqa: BLE001 - gloo raises RuntimeError or DistBackendError
                posted.error = err
        if posted.error is not None:
            closed = _closed(posted.error)
            peer = posted.peer if not collective else self.lost_member() if closed else None
            who = "a peer" if peer is None else f"rank {peer}"
            raise PeerLost(
                f"rank {self.rank}: {posted.what} with {who} failed at gossip round {gossip_round}: {_first_line(posted.error)}",
                peer,
                closed,
            )
        posted.completed = True

    def lost_member(self) -> int | None:
        """After a collective failed on a closed connection: the one member whose connection is closed (its process
        died), so that the agreement need not wait for its silence. gloo's error names an address, often a
        connection's own port, not a rank; so one byte is sent to each other member: the send fails at once to one
        whose connection is closed, and stays pending to the others (nothing receives it; the group is abandoned at
        the agreement). ``None`` unless exactly one fails."""
        lost, pending = [], []
        for peer in range(self.group.size()):
            if peer == self.rank:
                continue
            try:
                pending.append((peer, self.group.send([torch.zeros(1, dtype=torch.uint8)], peer, _PROBE_TAG)))
            except Exception as err:  # noqa: BLE001 - gloo raises at the post where the connection is closed
                if _closed(err):
                    lost.append(peer)
        deadline = time.monotonic() + PROBE_S
        while pending and time.monotonic() < deadline:
            for peer, work in [item for item in pending if item[1].is_completed()]:
                pending.remove((peer, work))
                try:
                    work.wait()
                except Exception as err:  # noqa: BLE001 - the connection closed since
                    if _closed(err):
                        lost.append(peer)
            time.sleep(POLL_S)
        self._probes += [work for _, work in pending]
        return lost[0] if len(lost) == 1 else None

    def abandon(self) -> None:
        """End every operation still pending on this generation's group, once the next one is agreed on (nothing
        uses this one after that): no watcher thread stays blocked on a worker that left, to wake during the
        interpreter's exit and abort it. A receive that times out makes gloo close every connection of its group,
        failing what is pending on each, here and at the other end."""
        for peer in range(self.group.size()):
            if peer == self.rank:
                continue
            try:
                work = self.group.recv([torch.empty(1)], peer, _ABANDON_TAG)
            except Exception:  # noqa: BLE001 - that connection is closed already: try another
                continue
            try:
                work.wait(timedelta(milliseconds=1))
            except Exception:  # noqa: BLE001 - the timeout that closes the group
                pass
            return

    def close(self) -> None:
        """Stop the waiting threads and wait for them, all within the peer timeout (what they wait on has arrived,
        failed, or was ended by :meth:`abandon`)."""
        for waiter in self._waiters.values():
            waiter.stop()
        deadline = time.monotonic() + self.timeout()
        for waiter in self._waiters.values():
            waiter.join(max(0.0, deadline - time.monotonic()))
        self._waiters.clear()
        super().close()


@dataclass(frozen=True)
class Generation:
    """One agreed member set: ``members`` (ids, ascending), the mixes each member of the previous set had completed
    when it was agreed on (``completed``), its number, the workers admitted into it (``joined``, the last members),
    and how many mixes a training step does (``per_batch``)."""

    number: int
    members: tuple[int, ...]
    completed: dict[int, int]
    joined: tuple[int, ...] = ()
    per_batch: int = 1

    @property
    def change_step(self) -> int:
        """The first mix done on the new graph: one past the furthest any member had got. With a joiner, one more,
        and the first mix of a training step: every member then ends a step with the old graph, and the joiner's
        donor sends its replica at that step boundary (:class:`~lightning_dpgan.gossip.live.LiveGossip`)."""
        step = max(self.completed.values()) + 1
        if self.joined:
            step += 1 + (-step) % self.per_batch  # the mixes before it fill whole training steps
        return step

    def to_json(self) -> str:
        return json.dumps({"members": list(self.members), "completed": self.completed, "joined": list(self.joined), "per_batch": self.per_batch})

    @classmethod
    def from_json(cls, number: int, text: str | bytes) -> Generation:
        record = json.loads(text)
        completed = {int(k): int(v) for k, v in record["completed"].items()}
        return cls(number, tuple(record["members"]), completed, tuple(record.get("joined", ())), int(record.get("per_batch", 1)))


def _address() -> tuple[str, int]:
    """The run's c10d store: ``MASTER_ADDR:MASTER_PORT``."""
    if not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        raise RuntimeError(
            "membership='live' agrees on the members in the run's c10d store at MASTER_ADDR:MASTER_PORT, and this "
            "worker has no MASTER_ADDR or MASTER_PORT: start it with torchrun, Lightning's launchers, or both set"
        )
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def silent(beat: float, unchanged_for: float, timeout: float, now: float) -> bool:
    """Whether a worker is silent past ``timeout``: its heartbeat has stood still here for ``GRACE_S`` (or the
    timeout, if shorter) and is older than ``timeout`` by its own clock, or has stood still here for ``timeout``."""
    if unchanged_for < min(GRACE_S, timeout):
        return False
    return now - beat > timeout or unchanged_for > timeout


class Membership:
    """This worker's part in agreeing on the run's members (see the module's docstring).

    Args:
        scope: keeps runs and fits apart in the store (the run id every rank shares).
        me: this worker's id.
        members: the ids of generation 0 (every rank of the default group).
        address: the store's ``(host, port)``; default ``MASTER_ADDR`` and ``MASTER_PORT``.
    """

    def __init__(self, scope: str, me: int, members: Sequence[int], address: tuple[str, int] | None = None) -> None:
        host, port = address or _address()
        timeout = timedelta(seconds=STORE_TIMEOUT_S)
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        self._watch_store = dist.TCPStore(host, port, is_master=False, timeout=timeout)  # one operation at a time each
        self.scope, self.me = scope, me
        self.prefix = f"lightning_dpgan/live/{scope}/"
        self.generation = Generation(0, tuple(members), {m: 0 for m in members})
        self.changing = threading.Event()
        self._closed = threading.Event()
        self._beat()
        self._watcher = threading.Thread(target=self._watch, name="lightning_dpgan membership", daemon=True)
        self._watcher.start()

    def _key(self, number: int, name: str) -> str:
        return f"{self.prefix}g{number}/{name}"

    def _beat(self, store: Any = None) -> None:
        (store or self.store).set(f"{self.prefix}hb/{self.me}", repr(time.time()))

    def _watch(self) -> None:
        while not self._closed.wait(HEARTBEAT_S):
            try:
                self._beat(self._watch_store)
                if not self.changing.is_set() and self._watch_store.check([self._key(self.generation.number + 1, "open")]):
                    self.changing.set()
            except Exception:  # the store's host is gone: the members stay as they are (docs/membership.md)
                return

    def close(self) -> None:
        """Stop the heartbeat and wait for its thread (one store operation at most): a daemon thread inside a call
        into torch when the interpreter exits wakes into a finishing interpreter, which aborts the process."""
        self._closed.set()
        if self._watcher is not threading.current_thread():
            self._watcher.join(STORE_TIMEOUT_S)

    def publish(self) -> None:
        """Say in the store that this is the newest live run (its scope and its size at the start), for joiners."""
        self.store.set(CURRENT_KEY, json.dumps({"scope": self.scope, "size": len(self.generation.members)}))

    def agree(self, completed: int, dead: Sequence[int], timeout: float, per_batch: int = 1) -> Generation:
        """The next generation: this worker has completed ``completed`` mixes and saw ``dead`` (ids) die. Returns when
        the set is fixed; every worker that reads it reads the same. It holds the workers that asked to join it by
        then; ``per_batch``: the mixes of one training step (where a joiner's change step may fall)."""
        old = self.generation
        number, store = old.number + 1, self.store
        store.compare_set(self._key(number, "open"), "", "1")  # tells the members that have not noticed yet
        for peer in dead:
            store.set(self._key(number, f"dead/{peer}"), "1")
        store.set(self._key(number, f"alive/{self.me}"), str(completed))
        seen: dict[int, tuple[str, float]] = {}  # member -> (heartbeat, when it last changed here)
        fixed = self._key(number, "members")
        while not store.check([fixed]):
            now, alive, decided = time.monotonic(), {}, True
            for member in old.members:
                if store.check([self._key(number, f"alive/{member}")]):
                    alive[member] = int(store.get(self._key(number, f"alive/{member}")))
                elif not store.check([self._key(number, f"dead/{member}")]):
                    key = f"{self.prefix}hb/{member}"
                    beat = store.get(key).decode() if store.check([key]) else "0"  # never beat: long silent
                    if member not in seen or seen[member][0] != beat:
                        seen[member] = (beat, now)
                    if not silent(float(beat), now - seen[member][1], timeout, time.time()):
                        decided = False  # alive and not here yet: wait for it, or for its silence
            if decided:
                joined = tuple(sorted(set(self._joiners(number)) - set(old.members)))
                record = Generation(number, (*sorted(alive), *joined), alive, joined, per_batch)
                store.compare_set(fixed, "", record.to_json())
                break
            time.sleep(POLL_S)
        generation = Generation.from_json(number, store.get(fixed))
        store.set(f"{self.prefix}gen", str(number))  # the newest generation, where a joiner starts looking
        self.generation = generation
        self.changing.clear()
        return generation

    def _joiners(self, number: int) -> list[int]:
        """The ids that asked to join generation ``number`` (one whose key is not written yet asks again later)."""
        asked = self.store.add(self._key(number, "joins"), 0)
        keys = [self._key(number, f"join/{i}") for i in range(asked)]
        return [int(self.store.get(key)) for key in keys if self.store.check([key])]

    @classmethod
    def join(cls, timeout: float, address: tuple[str, int] | None = None) -> Membership:
        """A worker started later: take the next id of the newest live run in the store, ask to join its next
        generation, and return once a generation holds this worker (:attr:`generation`). Asks again at the next
        generation where the members fixed one without it (it asked too late); a :class:`GossipPeerError` after
        ``timeout`` seconds without a set that holds it."""
        host, port = address or _address()
        lookup = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
        deadline = time.monotonic() + timeout
        while not lookup.check([CURRENT_KEY]):  # the members publish it as they start watching
            if time.monotonic() > deadline:
                raise GossipPeerError(f"no live run in the store at {host}:{port} within {timeout:g} s: nothing to join")
            time.sleep(POLL_S)
        run = json.loads(lookup.get(CURRENT_KEY))
        me = int(run["size"]) + lookup.add(f"lightning_dpgan/live/{run['scope']}/next_id", 1) - 1
        membership = cls(run["scope"], me, (), (host, port))
        membership._admit(deadline)
        return membership

    def _admit(self, deadline: float) -> None:
        store = self.store
        number = int(store.get(f"{self.prefix}gen")) + 1 if store.check([f"{self.prefix}gen"]) else 1
        while True:
            fixed = self._key(number, "members")
            if not store.check([fixed]):
                index = store.add(self._key(number, "joins"), 1) - 1
                store.set(self._key(number, f"join/{index}"), str(self.me))
                store.compare_set(self._key(number, "open"), "", "1")  # the members stop at their next wait
                while not store.check([fixed]):
                    if time.monotonic() > deadline:
                        raise GossipPeerError(f"worker {self.me} asked to join the live run, and no set of members held it in time")
                    time.sleep(POLL_S)
            generation = Generation.from_json(number, store.get(fixed))
            if self.me in generation.members:
                self.generation = generation
                self.changing.clear()
                return
            number += 1  # fixed before this worker asked: the next one

    def group(self, generation: Generation, timeout: float, members: Sequence[int] | None = None) -> Any:
        """The generation's own gloo group (every member must build it within ``timeout``); with ``members``, a group
        of those alone (the members without the workers joining, until they arrive)."""
        members = generation.members if members is None else tuple(members)
        prefix = "pg/" if members == generation.members else f"pg-{'-'.join(map(str, members))}/"
        store = dist.PrefixStore(self._key(generation.number, prefix), self.store)
        return dist.ProcessGroupGloo(store, members.index(self.me), len(members), timedelta(seconds=timeout))

