"""The record message's own encoder writes the same bytes as the general one, for every kind of value a
record message can hold, and what it writes decodes back to the message."""

from __future__ import annotations

import math

import pytest

from comgra_callbacks.store import messages
from comgra_callbacks.store.messages import RecordMessage, StepMeta, decode, encode

META = [
    StepMeta(0, "train", 0, 0, 1764672000.123456, "schedule"),
    StepMeta(12_345_678_901, "val", 3, 17, 0.0, "forced"),
    StepMeta(5, 'a "quoted" \\ type\nwith a newline', 1, 2, -0.0, "trigger:loss_spike"),
    StepMeta(7, "ünïcode ∆ step", 0, 0, 1e-300, "<img src=x onerror=alert(1)>"),
    StepMeta(8, "train", 0, 0, math.inf, "schedule"),
    StepMeta(9, "train", 0, 0, math.nan, "schedule"),
]

MESSAGES = [
    RecordMessage(META[0], 1, 0, 4096, 4096),
    RecordMessage(META[1], 64, 268_435_392, 268_439_552, 2_600_000, 64, None, 0, False),
    RecordMessage(META[2], 3, 128, 256, 128, None, (0, 5, 63), 2, True),
    RecordMessage(META[3], 3, 128, 256, 128, 8, (), 0, True),
    RecordMessage(META[4], 2, 0, 64, 64, 1, tuple(range(15)), 1, False),
    RecordMessage(META[5], 2, 0, 64, 64, 1, tuple(range(16)), 0, False),  # long: the general path
    RecordMessage(META[0], 2, 0, 64, 64, 1, tuple(range(64)), 0, False, version=messages.VERSION),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: f"step{m.meta.step}-index{None if m.sample_index is None else len(m.sample_index)}")
def test_the_record_encoder_writes_what_the_general_one_writes(message: RecordMessage) -> None:
    line = encode(message)
    assert line == messages._encode(message)
    assert line.startswith(b"\n") and line.endswith(b"\n") and line.count(b"\n") == 2  # one line, torn lines end at the next
    back = decode(line)
    assert isinstance(back, RecordMessage)
    if math.isnan(message.meta.time):  # NaN is not equal to itself: compare the rest
        assert math.isnan(back.meta.time) and back.meta.step == message.meta.step
    else:
        assert back == message


def test_values_json_cannot_hold_fail_as_in_the_general_encoder() -> None:
    """A step number that is not a Python int (a numpy one) is refused alike by both encoders."""
    np = pytest.importorskip("numpy")
    message = RecordMessage(StepMeta(np.int64(3), "train", 0, 0, 1.0, "schedule"), 1, 0, 64, 64)
    with pytest.raises(TypeError):
        messages._encode(message)
    with pytest.raises(TypeError):
        encode(message)
