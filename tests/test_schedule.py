"""The budget-aware cosine schedule: it ends at the floor when either limit is reached."""
import math

import pytest
import torch

from ptls_meles.schedule import BudgetCosine


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_steps_bind_when_there_is_no_time_budget():
    opt = _optimizer(2.0)
    sched = BudgetCosine(opt, total_steps=10, floor=0.1)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(2.0)
    assert seen[5] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway: the midpoint of lr and the floor
    assert seen[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(seen, seen[1:]))


def test_the_wall_clock_budget_binds_before_the_steps_do():
    clock = FakeClock()
    opt = _optimizer(1.0)
    sched = BudgetCosine(opt, total_steps=1_000_000, budget_seconds=60, floor=0.01, clock=clock)
    clock.now += 30  # half the budget, almost no steps
    opt.step()
    sched.step()
    assert sched.progress() == pytest.approx(0.5, abs=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-4)
    clock.now += 600  # past the budget: held at the floor
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_a_restored_schedule_continues_from_the_time_already_used():
    clock = FakeClock()
    sched = BudgetCosine(_optimizer(), total_steps=1000, budget_seconds=100, clock=clock)
    clock.now += 40
    state = sched.state_dict()
    assert all(isinstance(v, (int, float, bool, list, type(None))) for v in state.values())  # weights_only-safe
    later = FakeClock()
    later.now = 5_000.0  # another process: another clock origin
    restored = BudgetCosine(_optimizer(), total_steps=1000, budget_seconds=100, clock=later)
    restored.load_state_dict(state)
    assert restored.progress() == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [dict(total_steps=0), dict(total_steps=5, budget_seconds=0), dict(total_steps=5, floor=2)])
def test_impossible_limits_are_refused(bad):
    with pytest.raises(ValueError, match="BudgetCosine needs"):
        BudgetCosine(_optimizer(), **bad)


def test_training_with_cosine_anneals_per_step_to_the_floor(tmp_path, monkeypatch):
    """fit with lr_schedule=cosine: the rate falls at every step, over all the epochs' steps."""
    from conftest import events_frame
    from ptls_meles import train
    from ptls_meles.config import MeLESConfig
    from ptls_meles.prepare import prepare
    from ptls_meles.schema import EventSchema

    made = []

    class Recorded(BudgetCosine):
        def __init__(self, *args, **kwargs):
            self.rates = []  # the base class steps once on construction: the rate of step 0
            super().__init__(*args, **kwargs)
            made.append(self)

        def step(self, epoch=None):
            super().step()
            self.rates.append(self.get_last_lr()[0])

    monkeypatch.setattr(train, "BudgetCosine", Recorded)
    tx = events_frame(n_clients=40, max_len=30, seed=3)
    store, _ = prepare(tx, EventSchema("client", "day", ["mcc"], ["amount"], time_format="number"), show_progress=False)
    config = MeLESConfig(hidden_size=8, batch_size=8, max_epochs=3, num_workers=0, val_fraction=0.25, cnt_min=2,
                         cnt_max=10, patience=None, lr=0.01, lr_schedule="cosine", max_minutes=60)
    train.fit(store, config, out_dir=tmp_path, show_progress=False)
    (sched,) = made
    assert sched.budget_seconds == 3600 and sched.total_steps == len(sched.rates) - 1 >= 6
    assert sched.rates[0] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(sched.rates, sched.rates[1:]))  # per step, not per epoch
    assert sched.rates[-1] == pytest.approx(0.01 * 0.01)  # the steps bound first: the floor at the last one
