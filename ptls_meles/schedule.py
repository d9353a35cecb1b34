"""Learning-rate schedules that know the training's limit, in steps or in wall-clock time."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch


class BudgetCosine(torch.optim.lr_scheduler.LRScheduler):
    """Cosine annealing from each group's lr down to ``lr × floor``, stepped per optimizer
    step, over whichever limit comes first: ``total_steps`` or ``budget_seconds`` of wall-clock
    time since the scheduler was made.

    Why: under a wall-clock budget (``max_minutes``) the number of epochs is not known
    beforehand, so a cosine over ``max_epochs`` would barely decay and training would stop at
    full rate. Annealing to the end of whichever limit binds lets the last steps settle the
    weights (as in budgeted training, Li et al., ICLR 2020)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: float, budget_seconds: float | None = None,
                 floor: float = 0.01, clock: Callable[[], float] = time.monotonic) -> None:
        if not total_steps > 0 or (budget_seconds is not None and not budget_seconds > 0) or not 0 <= floor <= 1:
            raise ValueError(f"BudgetCosine needs total_steps > 0, budget_seconds > 0 or None and 0 <= floor <= 1; "
                             f"got {total_steps}, {budget_seconds}, {floor}")
        self.total_steps, self.budget_seconds, self.floor, self.clock = total_steps, budget_seconds, floor, clock
        self.start = clock()
        super().__init__(optimizer)

    def progress(self) -> float:
        """The share of the binding limit used so far, in [0, 1]."""
        done = self.last_epoch / self.total_steps if math.isfinite(self.total_steps) else 0.0
        if self.budget_seconds is not None:
            done = max(done, (self.clock() - self.start) / self.budget_seconds)
        return min(1.0, max(0.0, done))

    def state_dict(self) -> dict:
        """Plain numbers only (checkpoints load with ``weights_only``): the clock itself is not
        saved, the time used so far is, so a resumed run continues the same annealing."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock", "start")}
        state["elapsed_seconds"] = self.clock() - self.start
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        elapsed = state.pop("elapsed_seconds", 0.0)
        self.__dict__.update(state)
        self.start = self.clock() - elapsed

    def get_lr(self) -> list[float]:
        factor = self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * self.progress()))
        return [base * factor for base in self.base_lrs]
