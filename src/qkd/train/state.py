"""Where a run stands: the part of every ``last.pt`` snapshot that is neither weights nor optimizer state."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields


@dataclass
class RunState:
    """The run's position and what it has measured so far; saved at the top level of every snapshot.

    ``stage``/``epoch``: the next stage to run and the epochs of it done; ``history``: one record per epoch
    (as in metrics.jsonl); ``results``: per-stage results and float accuracies (the summary's body);
    ``changes``: settings changed on resume, and from where.

    >>> state = RunState.from_snapshot(torch.load("runs/mine/checkpoints/last.pt"))
    >>> state.stage, state.history[-1]["val_acc"]
    """

    stage: int = 0
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    student_quantized: bool = False
    num_classes: int | None = None
    changes: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The fields as the snapshot's top-level keys (the values themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_snapshot(cls, snapshot: dict) -> RunState:
        """The state a snapshot holds (copied: the snapshot stays as it was read)."""
        return cls(**{f.name: copy.deepcopy(snapshot[f.name]) for f in fields(cls) if f.name in snapshot})

    def finished_stage(self, key: str, epochs: int) -> dict:
        """The last epoch's record when it is stage ``key``'s last epoch (its validation figures), else ``{}``."""
        last = self.history[-1] if self.history else {}
        return last if last.get("stage") == key and last.get("epoch") == epochs else {}
