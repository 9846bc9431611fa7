"""``NoGossip``: no mixing (``GossipOptions(mixing=False)``), an ablation: each replica trains alone.

Consensus is still measured, and the headers still go to the neighbours each mixing step, so that a stop is still
agreed on (:mod:`.control`) and the step counts are still checked against each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpgan.gossip.base import GossipEngine
from lightning_dpgan.gossip.control import HEADER_BYTES


class NoGossip(GossipEngine):
    """Sends and checks the headers only; the tensors stay as they are."""

    @override
    def step(self, tensors: Sequence[Tensor]) -> None:
        self._begin_step()
        if not self.mixes_now():
            return
        if self.world_size > 1:
            nb = self._neighbours[self.phase % self.topology.period]
            message = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            received = torch.empty(len(nb.receive_from), HEADER_BYTES, dtype=torch.uint8)
            self.control.write(message, self.steps)
            posted = self.transport.exchange(message, received, nb.send_to, nb.receive_from)
            for p in posted:
                self.transport.wait(p, self.timeout(), self.phase)
            self._check_tags(self.control.read(received), nb.receive_from)
        self.phase += self.options.rounds
