"""EWC and experience replay together, by composition: every hook runs the EWC part, then the replay part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cl_runner.strategies.compose import Composite
from cl_runner.strategies.ewc import EWC, EWCConfig
from cl_runner.strategies.replay import Replay, ReplayConfig
from cl_runner.strategies.support import combined


@dataclass
class EWCReplayConfig(EWCConfig, ReplayConfig):
    name: str = "ewc_replay"

    def errors(self, key: str) -> list[str]:
        return EWCConfig.errors(self, key) + ReplayConfig.errors(self, key)


class EWCReplay(Composite):
    """An ``EWC`` and a ``Replay`` built from the same config (their options merged), composed: replay mixes
    its buffer into the batches and EWC's penalty gradient covers the mixed batches; EWC's Fisher is estimated
    on the finished task's examples."""

    name = "ewc_replay"
    Config = EWCReplayConfig
    supports = combined(EWC, Replay)

    def __init__(self, cfg: Any) -> None:
        self.ewc, self.replay = EWC(cfg), Replay(cfg)
        super().__init__(cfg, [self.ewc, self.replay])
