"""An auxiliary network an algorithm trains beside the policy (VGG-Flow's value-gradient residual, VARD's
value function), with its optimiser, as algorithm state.

It is built at the algorithm's first ``collect`` (it needs the model), so a checkpoint loaded before
then is kept until it exists; before it exists its state is empty.
"""

from __future__ import annotations

from typing import Any

import torch


class AuxNet:
    """``net`` and ``opt`` once ``build`` has run; ``state_dict`` / ``load_state_dict`` under ``keys``."""

    def __init__(self, keys: tuple[str, str] = ("net", "opt")):
        self.keys = keys
        self.net: torch.nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self._pending: dict | None = None

    def build(self, net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.net, self.opt = net, opt
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def state_dict(self) -> dict[str, Any]:
        if self.net is None:
            return {}
        return {self.keys[0]: {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                self.keys[1]: self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.net is None:  # built at the first collect, from the model
            self._pending = state
            return
        self.net.load_state_dict(state[self.keys[0]])
        self.opt.load_state_dict(state[self.keys[1]])
        self._pending = None
