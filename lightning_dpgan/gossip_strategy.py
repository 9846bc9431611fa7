"""What the Trainer's and Fabric's decentralized strategies share: one base, placed before their DDP strategy.

Lightning's Trainer and Fabric each have their own ``DDPStrategy``, with the launch, the process group and the
collectives the two frameworks rely on; the decentralized strategies subclass each (``isinstance`` checks, the
``DistributedSampler`` and ``sync_dist`` key off them) and add the same things on top, which live here once: the
``Gossiper`` and its options, the launching process's checks, the gossip's own process group, collectives bounded
like a gossip exchange, and the teardown.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar

import torch

from lightning_dpgan.gossip import DistributedTransport, GossipEngine, GossipOptions, GossipPeerError, Stop
from lightning_dpgan.gossiper import Gossiper
from lightning_dpgan.processes import check_master_port_free, close_gossip_group, die_with_parent, gossip_group
from lightning_dpgan.topology import Topology

#: steps between consensus measurements (a collective), by default in both strategies
CONSENSUS_EVERY = 50
#: the arguments of the frameworks' DDPStrategy that both strategies take (each adds its precision argument);
#: the others are for the DDP wrapper, which gossip does without, and ``timeout`` is ``gossip.startup_timeout``
DDP_ARGUMENTS = frozenset({"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "process_group_backend", "start_method"})


class GossipStrategyMixin:
    """Gossip on top of a DDP strategy (Lightning's or Fabric's), which must come after it in the bases.

    The constructor takes the gossip's arguments, and passes the framework's DDP arguments (:data:`DDP_ARGUMENTS`
    and :attr:`ddp_arguments`) on by keyword, with the gossip's start-up timeout as the process group's. A subclass
    names its framework's popen launcher and the patient one that replaces it.

    Args:
        topology: a name from :data:`lightning_dpgan.topology.TOPOLOGIES`, or a built :class:`Topology`.
        gossip: how replicas gossip (:class:`~lightning_dpgan.gossip.GossipOptions`, or a dict of its fields):
            rounds ``t``, wire dtype, overlap, timeouts, ...
        topology_options: extra arguments for the named topology (``shape`` for a torus, ``degree``/``seed``
            for random_regular, ``matrix``/``edges`` for custom, ``weights``).
        consensus_every: measure the consensus distance every this many steps of each optimizer (0: never).
        mix_buffers: also mix floating-point buffers such as BatchNorm running statistics.
        ddp: the framework's ``DDPStrategy`` arguments, by keyword: ``accelerator``, ``parallel_devices``,
            ``cluster_environment``, ``checkpoint_io``, ``process_group_backend``, ``start_method`` (``"popen"``), and
            ``precision_plugin`` (Trainer) or ``precision`` (Fabric).
    """

    gossiper: Gossiper
    popen_launcher: type  # the framework's popen launcher ...
    patient_launcher: type  # ... and its subclass that lets rank 0 name a failed worker before the rest are killed
    #: the DDP arguments this framework's strategy takes
    ddp_arguments: ClassVar[frozenset[str]] = DDP_ARGUMENTS
    _gossip_group: torch.distributed.ProcessGroup | None = None

    def __init__(
        self,
        topology: str | Topology = "ring",
        gossip: GossipOptions | Mapping[str, Any] | None = None,
        topology_options: Mapping[str, Any] | None = None,
        consensus_every: int = CONSENSUS_EVERY,
        mix_buffers: bool = True,
        **ddp: Any,
    ) -> None:
        unknown = sorted(set(ddp) - self.ddp_arguments)
        if unknown:
            allowed = ", ".join(sorted(self.ddp_arguments))
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) {', '.join(unknown)}; allowed besides the gossip's: {allowed}")
        self.gossiper = Gossiper(topology, gossip, topology_options, consensus_every, mix_buffers)
        super().__init__(timeout=timedelta(seconds=self.gossiper.options.startup_timeout), **ddp)  # type: ignore[call-arg]

    @property
    def gossip(self) -> GossipOptions:
        return self.gossiper.options

    @property
    def topology(self) -> Topology | None:
        return self.gossiper.topology

    @property
    def engine(self) -> GossipEngine | None:
        return self.gossiper.engine

    @property
    def consensus_distance(self) -> dict[str, float]:
        """Latest consensus distance per top-level submodule, identical on every rank."""
        return self.gossiper.consensus_distance

    @property
    def member_lost(self) -> GossipPeerError | None:
        """In a live run, a member lost (or an agreement begun) since the last step: until the next step the
        framework's collectives give this worker's own values (the evaluation then skips its scores)."""
        return self.gossiper.deferred

    @property
    def stopped(self) -> Stop | None:
        """The stop every rank took, once taken (a SIGTERM or a non-finite value)."""
        return self.gossiper.stopped

    @property
    def members(self) -> tuple[int, int] | None:
        """(this worker's rank among the current members, their number) in a live run; ``None`` in a fixed one (the
        global rank and world size hold)."""
        live = self.gossiper.live_engine
        return (live.present.index(live.me), len(live.present)) if live is not None else None

    # ------------------------------------------------------------------ launch and process group
    def _configure_launcher(self) -> None:
        # Runs in the launching process before any worker starts: the place to reject a bad world size or port (the
        # frameworks have no public hook there, nor a public way to hand the strategy another launcher).
        self.gossiper.build_topology(self.num_nodes * self.num_processes)  # type: ignore[attr-defined]
        super()._configure_launcher()  # type: ignore[misc]
        launcher = self._launcher  # type: ignore[attr-defined]
        if type(launcher) is self.popen_launcher:
            self._launcher = self.patient_launcher(self.cluster_environment, self.num_processes, self.num_nodes)  # type: ignore[attr-defined]
            self._launcher.live = self.gossip.membership == "live"  # a failed worker is let go, not the run ended
        starts_workers = self._launcher is not None and not self.cluster_environment.creates_processes_externally  # type: ignore[attr-defined]
        if starts_workers and self.num_nodes == 1 and self.num_processes > 1:  # type: ignore[attr-defined]
            check_master_port_free()

    def setup_environment(self) -> None:
        """A worker a launcher started dies with it; after the framework's process group, the gossip's own group and
        engine, and one run id for the checkpoints of every rank."""
        environment = self.cluster_environment  # type: ignore[attr-defined]
        if environment is not None and environment.creates_processes_externally:
            die_with_parent()
        # the backend the framework's group uses, chosen for the device where none was asked for: no public getter
        backend = self._get_process_group_backend()  # type: ignore[attr-defined]
        if self.gossip.membership == "live" and backend != "gloo":
            raise ValueError(
                "membership='live' runs on CPU workers only (gloo): each new member set gets a gloo group, which "
                f"cannot carry CUDA tensors; got process_group_backend={backend!r}"
            )
        super().setup_environment()  # type: ignore[misc]
        self._gossip_group, world_size = gossip_group(backend, timedelta(seconds=self.gossip.startup_timeout))
        rank = self.global_rank  # type: ignore[attr-defined]
        self.gossiper.connect(world_size, rank, DistributedTransport(rank, self._gossip_group, self.gossip.chunk_bytes))
        if world_size > 1:
            self.gossiper.run_id = self.broadcast(self.gossiper.run_id)
            self.gossiper.go_live(rank)

    # ------------------------------------------------------------------ collectives
    # The framework's own (checkpoints, callbacks, sync_dist): after the warm-up bounded by the peer timeout, and a
    # worker that does not come is named (GossipPeerError), as in the gossip.
    # In a live run (membership="live") they go through the members' group instead (LiveGossip._collective): after a
    # change the default group holds a worker that left, and its waits cannot give way to the members' agreement.
    def barrier(self, name: str | None = None) -> None:
        if (live := self.gossiper.live_engine) is not None:
            return live.barrier()
        with self.gossiper.collective(f"barrier {name!r}" if name else "barrier"):
            super().barrier(name)  # type: ignore[misc]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if (live := self.gossiper.live_engine) is not None:
            return live.broadcast_object(obj, src)
        with self.gossiper.collective("broadcast"):
            return super().broadcast(obj, src)  # type: ignore[misc]

    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        if (live := self.gossiper.live_engine) is not None:
            return live.all_gather_tensor(tensor)  # one row per member
        with self.gossiper.collective("all_gather"):
            return super().all_gather(tensor, group, sync_grads)  # type: ignore[misc]

    def teardown(self) -> None:
        self.gossiper.detach()
        if self.engine is not None:
            self.engine.forget()  # after an error the peers may be gone: nothing left to wait for
        close_gossip_group(self._gossip_group)
        self._gossip_group = None
        super().teardown()  # type: ignore[misc]
