"""Schedules, triggers, sample selectors and the policy, framework-free: exact step sets and decisions."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from comgra_callbacks.errors import ConfigError, ConfigTypeError, RecordingError
from comgra_callbacks.recording.policy import RecordingPolicy, detail_rules
from comgra_callbacks.recording.sampling import Balanced, Indices, TopK
from comgra_callbacks.recording.schedules import (
    AllOf,
    AnyOf,
    Budget,
    Decaying,
    Every,
    LogSpaced,
    Never,
    Schedule,
    Spaced,
    Steps,
)
from comgra_callbacks.recording.triggers import GradNorm, LossSpike, NonFinite, Predicate, StepSummary


def steps_of(schedule: Schedule, n: int = 200) -> list[int]:
    """The steps a schedule records when it sees every step 0..n-1 (feeding back what it kept)."""
    kept: list[int] = []
    last = None
    for step in range(n):
        if schedule.wants(step, last):
            kept.append(step)
            last = step
            schedule.counted(step)
            schedule.stored(100)
    return kept


def test_every() -> None:
    assert steps_of(Every(25)) == [0, 25, 50, 75, 100, 125, 150, 175]
    assert steps_of(Every(50, start=10)) == [10, 60, 110, 160]
    assert steps_of(Every(1), 5) == [0, 1, 2, 3, 4]


def test_steps_and_ranges() -> None:
    assert steps_of(Steps([5, 7, [10, 14], [100, 150, 20], range(190, 200, 4)])) == [5, 7, 10, 11, 12, 13, 100, 120, 140, 190, 194, 198]


def test_steps_with_many_overlapping_ranges_match_a_plain_membership_test() -> None:
    """Steps looks only at the ranges that can hold a step (by their starts and how far they reach): the same
    steps as asking every range, for overlapping, nested, stepped, empty and descending ranges in any order."""
    import random

    rng = random.Random(5)
    for _ in range(20):
        items: list[Any] = []
        for _ in range(rng.randint(1, 40)):
            start = rng.randint(0, 300)
            stop = start + rng.choice([0, 1, 3, 20, 150])
            kind = rng.random()
            if kind < 0.2:
                items.append(rng.randint(0, 400))
            elif kind < 0.6:
                items.append([start, stop] if kind < 0.4 else [start, stop, rng.randint(1, 7)])
            else:
                items.append(range(stop, start, -rng.randint(1, 5)) if kind < 0.7 else range(start, stop, rng.randint(1, 5)))
        ranges = [i if isinstance(i, range) else range(*i) for i in items if not isinstance(i, int)]
        singles = {i for i in items if isinstance(i, int)}
        want = [s for s in range(500) if s in singles or any(s in r for r in ranges)]
        assert steps_of(Steps(items), 500) == want, items


def test_decaying_dense_then_sparse() -> None:
    assert steps_of(Decaying(every=(1, 10, 100), until=(10, 100)), 450) == list(range(10)) + list(range(10, 100, 10)) + [100, 200, 300, 400]
    default = steps_of(Decaying(), 3000)
    assert default[:100] == list(range(100)) and default[100:103] == [100, 110, 120] and default[-3:] == [2000, 2100, 2200][:0] + default[-3:]
    assert [s for s in default if s >= 1000] == list(range(1000, 3000, 100))


def test_log_spaced_is_dense_then_logarithmic() -> None:
    kept = steps_of(LogSpaced(per_decade=10), 100_000)
    assert kept[:6] == [0, 1, 2, 3, 4, 5]
    for decade in (10, 100, 1000, 10_000):
        assert 8 <= len([s for s in kept if decade <= s < 10 * decade]) <= 11


def test_spaced_catches_a_rare_type_at_irregular_steps() -> None:
    rare_steps = [3, 17, 18, 41, 42, 43, 99]
    schedule, last, kept = Spaced(20), None, []
    for step in rare_steps:
        if schedule.wants(step, last):
            kept.append(step)
            last = step
    assert kept == [3, 41, 99]
    assert [s for s in rare_steps if Every(20).wants(s)] == []  # Every would have missed all of them


def test_composition() -> None:
    assert steps_of(Every(50) | Steps([3])) == [0, 3, 50, 100, 150]
    assert steps_of(AllOf(Every(10), Steps([[30, 70]]))) == [30, 40, 50, 60]
    assert repr(Every(10) | Decaying()) == "AnyOf(Every(10), Decaying(every=(1, 10, 100, 1000), until=(100, 1000, 10000)))"
    assert steps_of(Never()) == []
    assert isinstance(Every(2) & Every(3), AllOf) and isinstance(Every(2) | Every(3), AnyOf)


def test_budget_thins_out_rather_than_stops() -> None:
    assert steps_of(Budget(Every(1), max_records=5), 100) == [0, 1, 2, 3, 4, 6, 10, 18, 34, 66]
    assert steps_of(Budget(Every(1), max_bytes=300), 40) == [0, 1, 2, 4, 8, 16, 32]
    thinned = steps_of(Budget(Every(2), max_records=3), 1000)
    assert thinned[:3] == [0, 2, 4] and len(thinned) < 15 and thinned[-1] > 500


def test_budget_state_round_trip() -> None:
    first = Budget(Every(1), max_records=4)
    for step in range(4):
        assert first.wants(step)
        first.counted(step)
        first.stored(10)
    state = json.loads(json.dumps(first.state_dict()))
    second = Budget(Every(1), max_records=4)
    second.load_state_dict(state)
    assert [s for s in range(4, 40) if second.wants(s) and (second.counted(s) or True)] == [5, 9, 17, 33]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Every(0), ConfigError, r"`Every\(n=...\)`: expected a positive int, got 0\."),
        (lambda: Every("3"), ConfigTypeError, r"`Every\(n=...\)`: expected a positive int, got '3' of type str\."),
        (lambda: Steps("1,2"), ConfigTypeError, r"`Steps\(steps=...\)`: expected a list of steps"),
        (lambda: Steps([[5, 2]]), ConfigError, r"expected \[start, stop\(, every\)\] with 0 <= start <= stop"),
        (lambda: Decaying(every=(1, 10), until=(10, 100)), ConfigError, r"expected one more `every` than `until`"),
        (lambda: Decaying(every=(1, 10, 100), until=(100, 10)), ConfigError, r"`Decaying\(until=...\)`: expected increasing positive steps"),
        (lambda: Budget(Every(1)), ConfigError, r"expected max_records or max_bytes"),
        (lambda: Budget(5, max_records=3), ConfigTypeError, r"`Budget\(schedule=...\)`: expected a schedule"),
        (lambda: LossSpike(threshold=0), ConfigError, r"`LossSpike\(threshold=...\)`: expected a positive number"),
        (lambda: LossSpike(window=5, min_history=10), ConfigError, r"expected at most window=5"),
        (lambda: GradNorm(-1.0), ConfigError, r"`GradNorm\(threshold=...\)`"),
        (lambda: Predicate("x"), ConfigTypeError, r"`Predicate\(fn=...\)`: expected a callable"),
        (lambda: TopK("", k=2), ConfigTypeError, r"`TopK\(node=...\)`"),
        (lambda: Balanced("label", per_category=0), ConfigError, r"`Balanced\(per_category=...\)`"),
        (lambda: Indices("idx", []), ConfigError, r"expected at least one dataset index"),
        (lambda: RecordingPolicy(schedule=3), ConfigTypeError, r"`ComgraCallback\(schedule=...\)`: expected a schedule"),
        (lambda: RecordingPolicy(arm_every=2), ConfigError, r"arming needs triggers.*HINT: add triggers="),
        (lambda: RecordingPolicy(triggers=["loss"]), ConfigTypeError, r"expected triggers such as LossSpike\(\)"),
        (lambda: detail_rules({"x": "everything"}, "ComgraCallback"), ConfigError, r"`ComgraCallback\(detail=...\)`: expected a level in \['stats', 'neurons', 'samples', 'full'\]"),
    ],
)
def test_bad_arguments(make: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def summary(loss: float | None = None, nan: int = 0, grads: dict[str, float] | None = None) -> StepSummary:
    stats: dict[tuple[str, str], dict[str, float]] = {("x", "value"): {"mean": 0.0, "nan_count": float(nan), "inf_count": 0.0}}
    if loss is not None:
        stats[("loss", "value")] = {"mean": loss, "nan_count": 0.0, "inf_count": 0.0}
    for name, l2 in (grads or {}).items():
        stats[(name, "grad")] = {"l2": l2, "nan_count": 0.0, "inf_count": 0.0}
    return StepSummary(stats, frozenset(grads or {}))


def test_loss_spike_uses_running_statistics_and_ignores_its_own_spikes() -> None:
    trigger = LossSpike(threshold=4.0, window=50, min_history=10)
    losses = [1.0 + 0.01 * math.sin(i) for i in range(30)] + [5.0, 1.0, 6.0, 1.0]
    fired = [i for i, v in enumerate(losses) if trigger.check(summary(v))]
    assert fired == [30, 32]
    state = json.loads(json.dumps(trigger.state_dict()))
    restored = LossSpike(threshold=4.0, window=50, min_history=10)
    restored.load_state_dict(state)
    assert restored.check(summary(7.0)) and not restored.check(summary(1.0))


def test_nonfinite_and_grad_norm() -> None:
    assert NonFinite().check(summary(nan=1)) and not NonFinite().check(summary())
    assert GradNorm(5.0).check(summary(grads={"a": 3.0, "b": 4.5})) and not GradNorm(6.0).check(summary(grads={"a": 3.0, "b": 4.5}))


def test_policy_per_step_type_and_arming() -> None:
    policy = RecordingPolicy(schedule={"rare": Every(1), "*": Every(10)}, step_type=lambda batch, i: batch["kind"], triggers=[NonFinite()], arm_every=2)
    kinds = ["common", "rare"] * 10
    plans = [(step, policy.step_type_of({"kind": k}, step), policy.plan(step, k)) for step, k in enumerate(kinds)]
    assert [(s, t) for s, t, p in plans if p == "record"] == [(0, "common"), (1, "rare"), (3, "rare"), (5, "rare"), (7, "rare"), (9, "rare"), (10, "common"), (11, "rare"), (13, "rare"), (15, "rare"), (17, "rare"), (19, "rare")]
    assert [s for s, _, p in plans if p == "arm"] == [2, 4, 6, 8, 12, 14, 16, 18]
    assert policy.decide(summary(), None) is None and policy.decide(summary(nan=2), None) == "NonFinite"
    assert policy.decide(summary(nan=2), "schedule") == "schedule"


def test_policy_step_type_from_a_batch_field() -> None:
    policy = RecordingPolicy(step_type="kind")
    assert policy.step_type_of({"kind": ["short", "short"]}, 0) == "short"
    assert policy.step_type_of({"kind": torch.tensor(3)}, 0) == "3"
    with pytest.raises(RecordingError, match=r"the batch has no field 'kind'; it has \['x'\]"):
        policy.step_type_of({"x": 1}, 0)
    with pytest.raises(RecordingError, match=r"expected a non-empty string per batch, got ''"):
        policy.step_type_of({"kind": ""}, 0)


def test_policy_state_round_trip() -> None:
    policy = RecordingPolicy(schedule=Spaced(5), triggers=[LossSpike(min_history=2)])
    for step in range(12):
        policy.plan(step, "train")
        policy.decide(summary(1.0 + step * 0.01), None)
    state = json.loads(json.dumps(policy.state_dict()))
    other = RecordingPolicy(schedule=Spaced(5), triggers=[LossSpike(min_history=2)])
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert [s for s in range(12, 20) if other.plan(s, "train") == "record"] == [15]


def test_selectors_choose_the_right_samples() -> None:
    batch = {"idx": torch.tensor([40, 7, 12, 99, 7]), "label": torch.tensor([1, 0, 1, 2, 0])}
    positions, ids = Indices("idx", [7, 99, 1000]).select(batch, {}, 5, 4)
    assert positions.tolist() == [1, 3, 4] and ids.tolist() == [7, 99, 7]
    assert Indices("idx", [1000]).select(batch, {}, 5, 4)[0].tolist() == []
    values = {"per_sample_loss": torch.tensor([0.3, 2.0, 0.1, 5.0, 1.0])}
    assert TopK("per_sample_loss").select(batch, values, 5, 2)[0].tolist() == [3, 1]
    assert TopK("per_sample_loss", k=1, largest=False).select(batch, values, 5, 2)[0].tolist() == [2]
    assert Balanced("label", per_category=2).select(batch, {}, 5, 4)[0].tolist() == [1, 4, 0, 2, 3]
    assert Balanced(lambda b: ["a", "b", "a", "a", "b"]).select(batch, {}, 5, 4)[0].tolist() == [0, 1]
    with pytest.raises(RecordingError, match=r"no tensor named 'missing' was recorded"):
        TopK("missing").select(batch, values, 5, 2)
    with pytest.raises(RecordingError, match=r"expected one value per sample \(5\), got shape \(2,\)"):
        TopK("short").select(batch, {"short": torch.ones(2)}, 5, 2)


def test_schedules_and_triggers_build_from_yaml_with_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--schedule", type=Schedule)
    parser.add_argument("--triggers", type=list[LossSpike | NonFinite | GradNorm])
    config = parser.parse_string(
        """
schedule:
  class_path: comgra_callbacks.recording.schedules.Budget
  init_args:
    schedule:
      class_path: comgra_callbacks.recording.schedules.Decaying
      init_args: {every: [1, 10], until: [50]}
    max_records: 100
triggers:
  - class_path: comgra_callbacks.recording.triggers.LossSpike
    init_args: {threshold: 4.0}
  - class_path: comgra_callbacks.recording.triggers.NonFinite
"""
    )
    built = parser.instantiate_classes(config)
    assert repr(built.schedule) == "Budget(Decaying(every=(1, 10), until=(50,)), max_records=100)"
    assert [repr(t) for t in built.triggers] == ["LossSpike(threshold=4.0, window=100, min_history=20, node='loss')", "NonFinite()"]
