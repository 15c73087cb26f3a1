"""One writer core, two transports: the typed messages survive their wire format, a message of another
version is refused clearly, and the thread writer and the writer process write the same store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from comgra_callbacks import ComgraCallback, StoreError, open_run
from comgra_callbacks.errors import ComgraError, FormatVersionError
from comgra_callbacks.store.messages import (
    FULL,
    VERSION,
    CloseMessage,
    ErrorAnswer,
    FlushMessage,
    LayoutMessage,
    OpMessage,
    PackedItem,
    PackedLayoutMessage,
    PackedMessage,
    RawItem,
    ReadyAnswer,
    RecordMessage,
    StartMessage,
    StepMeta,
    decode,
    decode_answer,
    encode,
)
from tests.conftest import classification_loader, make_mlp_module, quiet_trainer

META = StepMeta(7, "train", 1, 3, 12.5, "schedule")
RAW = RawItem("net.0", None, 0, "value", "bfloat16", "float32", (8, 5), 128, False, True, 2, None, 1)
UPDATE = RawItem("net.0.weight", "w", 2, "update", "float32", "float32", (5, 6), 0, True, False, FULL, -1, None)
MESSAGES = [
    StartMessage("/runs", "r", {"anon": True}, False, {"hparams": {"lr": 0.1}}, 256, 32 << 20, 2.0),
    StartMessage("s3://bucket/runs", "r/rank1", None, True, {}, 1, 1, 0.01),
    LayoutMessage(3, (RAW, UPDATE)),
    LayoutMessage(4, ()),
    RecordMessage(META, 3, 4096, 8192, 4096, 8, (5, 1, 7)),
    RecordMessage(META, 3, 0, 64, 64, None, None, part=2, more=True),
    PackedMessage(META, 0, 44, 192, 176, (PackedItem("loss", None, 0, "value", "float32", None, None),
                                          PackedItem("net.0", "x", 1, "grad", "float16", (4, 5), (2, 5)))),
    PackedMessage(META, 64, 11, 128, 44, (), part=1, more=False),
    PackedLayoutMessage(5, (PackedItem("loss", None, 0, "value", "float32", None, None), PackedItem("net.0", "x", 1, "grad", "float16", (4, 5), (2, 5)))),
    PackedMessage(META, 0, 44, 192, 176, 5),  # its series named by the layout before
    OpMessage("add_scalars", ([[3, "train/loss", 0.25], [4, "train/loss", float("inf")]],)),
    OpMessage("start_segment", (0,)),
    OpMessage("commit"),
    OpMessage("write_graph", ({"train": {"nodes": [{"name": "a", "kind": "module"}], "edges": [["a", "b"]]}},)),
    FlushMessage(12),
    CloseMessage("failed", "KeyboardInterrupt"),
    CloseMessage("finished"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=[f"{type(m).__name__}-{i}" for i, m in enumerate(MESSAGES)])
def test_every_message_type_survives_its_wire_format(message: Any) -> None:
    line = encode(message)
    assert line.startswith(b"\n") and line.endswith(b"\n") and line.count(b"\n") == 2  # one line, a torn one ends
    assert decode(line) == message
    assert decode(line.decode()) == message


def test_every_message_type_is_covered() -> None:
    from comgra_callbacks.store import messages

    assert {type(m) for m in MESSAGES} == set(messages._TYPES.values())


def test_a_message_of_another_version_is_refused_clearly() -> None:
    line = encode(FlushMessage(1, version=VERSION + 1))
    with pytest.raises(FormatVersionError, match=rf"a FlushMessage of version {VERSION + 1}, but this writer reads version {VERSION}\. HINT: .*reinstall"):
        decode(line)
    with pytest.raises(ValueError, match="version None"):  # also a ValueError; a missing version is not the current one
        decode(b'{"type": "flush", "id": 1}')


def test_a_line_that_is_not_a_message_is_refused_clearly() -> None:
    with pytest.raises(StoreError, match=r"expected a message of type \[.*'flush'.*\], got 'flushh'"):
        decode(b'{"type": "flushh", "version": 2, "id": 1}')
    with pytest.raises(StoreError, match=r"expected a RawItem as a list of 14 values"):
        decode(b'{"type": "layout", "version": 2, "id": 1, "items": [["a", null, 0, "value"]]}')
    with pytest.raises(StoreError, match=r"a FlushMessage with the fields \['id', 'stray', 'version'\]"):
        decode(b'{"type": "flush", "version": 2, "id": 1, "stray": 2}')
    with pytest.raises(ValueError):  # a torn line: not JSON (the writer process skips it)
        decode(b'{"type": "flu')
    with pytest.raises(StoreError, match=r"expected one of \[.*'FlushMessage'.*\], got RawItem"):
        encode(RAW)  # type: ignore[arg-type]


def test_an_unknown_operation_is_refused_where_it_is_made() -> None:
    with pytest.raises(StoreError, match=r"`OpMessage\(name='drop_everything'\)`: expected one of \['add_notes'"):
        OpMessage("drop_everything")
    assert issubclass(StoreError, ComgraError)


ANSWERS = [ReadyAnswer(), ErrorAnswer("a run already exists at /runs/r", "RunExistsError"), ErrorAnswer("", "OSError")]


@pytest.mark.parametrize("answer", ANSWERS, ids=[type(a).__name__ for a in ANSWERS])
def test_the_writer_process_start_answer_survives_its_wire_format(answer: Any) -> None:
    line = encode(answer)
    assert line.startswith(b"\n") and line.count(b"\n") == 2
    assert decode_answer(line) == answer and decode_answer(line.strip().decode()) == answer
    with pytest.raises(StoreError, match=r"`decode`: expected a message of type .*got '(ready|error)'"):
        decode(line)  # an answer is not a message to the writer


def test_a_start_answer_that_cannot_be_read_is_refused_clearly() -> None:
    with pytest.raises(FormatVersionError, match=rf"`decode_answer`: a ReadyAnswer of version {VERSION + 1}, but this trainer reads version {VERSION}\. HINT: .*reinstall"):
        decode_answer(encode(ReadyAnswer(version=VERSION + 1)))
    with pytest.raises(FormatVersionError, match="an ErrorAnswer of version None, but"):
        decode_answer(b'{"type": "error", "error": "x", "error_type": "OSError"}')
    with pytest.raises(StoreError, match=r"`decode_answer`: expected an answer as one JSON line, got b'\{\"ready\": tr'"):
        decode_answer(b'{"ready": tr')
    with pytest.raises(StoreError, match=r"`decode_answer`: expected an answer of type \['error', 'ready'\], got None"):
        decode_answer(b'{"ready": true}')  # the untyped answer of earlier versions
    with pytest.raises(StoreError, match=r"expected an answer of type .*got 'flush'"):
        decode_answer(encode(FlushMessage(1)))
    with pytest.raises(StoreError, match=r"`decode_answer`: an ErrorAnswer with the fields \['error', 'version'\]"):
        decode_answer(b'{"type": "error", "version": 2, "error": "x"}')


@pytest.mark.slow
def test_the_writer_process_reports_a_message_of_another_version(tmp_path: Path) -> None:
    """End to end: the process refuses the message, the training side reports why, the run says failed."""
    from comgra_callbacks.recording.process_writer import ProcessWriter

    writer = ProcessWriter(root=str(tmp_path), run="r", on_error="raise")
    writer._send(FlushMessage(1, version=99))
    with pytest.raises(StoreError, match=rf"writing run 'r' failed: FormatVersionError: .*version 99, but this writer reads version {VERSION}"):
        writer.flush(timeout=60)
    with pytest.warns(RuntimeWarning, match="may be incomplete"):
        writer.close("finished")
    # an error the process reported is not one of a process that stopped answering: close() told it to close
    # and waited while it marked the run (it used to leave it to finish alone, and the run could read "running")
    assert writer.proc.poll() is not None
    run = open_run(tmp_path / "r")
    assert run.status == "failed" and "version 99" in run.meta["error"]


# ------------------------------------------------------------------------------- the two transports
def _contents(run: Any) -> dict[tuple[Any, ...], Any]:
    """Everything a reader gets from a run: the steps, every series' statistics, and every step's per-neuron
    statistics and samples where the detail kept them."""
    out: dict[tuple[Any, ...], Any] = {("steps",): run.steps[["step", "step_type", "epoch", "batch_idx", "reason"]].to_numpy().tolist()}
    for node in run.nodes:
        for view in run.views(node):
            for role in run.roles(node):
                for iteration in run.iterations(node):
                    try:
                        frame = run.stats(node, view=view, role=role, iteration=iteration)
                    except (KeyError, StoreError):
                        continue  # no series of this view, role and iteration
                    out[(node, view, role, iteration, "stats")] = frame
                    for step in frame.index:
                        for what, read in (("neurons", run.neurons), ("samples", run.samples)):
                            try:
                                out[(node, view, role, iteration, what, int(step))] = np.asarray(read(node, int(step), view=view, role=role, iteration=iteration))
                            except KeyError:
                                pass  # this detail was not kept
    return out


def _record(tmp: Path, writer: str) -> Any:
    cb = ComgraCallback(str(tmp / "runs"), run_name=writer, n_samples=2, writer=writer)  # type: ignore[arg-type]
    trainer = quiet_trainer([cb], tmp, max_steps=4)
    trainer.fit(make_mlp_module(), classification_loader(n_batches=4))
    return open_run(tmp / "runs" / writer)


@pytest.mark.slow
@pytest.mark.parametrize("reduce_where", ["training", "writer"])
def test_both_transports_write_the_same_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reduce_where: str) -> None:
    """The same seeded Lightning run through the thread writer and the writer process: the same records and
    the same numbers. Reduced on the training thread both ship the same results (equal to the bit); reduced
    in the writer process (numpy) the statistics agree within float tolerance."""
    monkeypatch.setenv("COMGRA_REDUCE", reduce_where)
    thread, process = _record(tmp_path, "thread"), _record(tmp_path, "process")
    assert thread.status == process.status == "finished"
    a, b = _contents(thread), _contents(process)
    assert a.keys() == b.keys()
    assert len(a[("steps",)]) == 4 and sum(k[-2] == "neurons" for k in a if len(k) == 6) > 0
    assert sum(k[-2] == "samples" for k in a if len(k) == 6) > 0
    for key in a:
        if key == ("steps",):
            assert a[key] == b[key]
        elif key[-1] == "stats":
            np.testing.assert_array_equal(a[key].index, b[key].index)
            if reduce_where == "training":
                np.testing.assert_array_equal(a[key].to_numpy(), b[key].to_numpy(), err_msg=str(key))
            else:
                np.testing.assert_allclose(a[key].to_numpy(), b[key].to_numpy(), rtol=2e-5, atol=1e-6, err_msg=str(key))
        elif reduce_where == "training" or key[-2] == "samples":  # samples are copies either way
            np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-6, err_msg=str(key))


def test_a_long_layout_is_encoded_once_and_decodes_the_same() -> None:
    """The layout of a step (~200 series) goes with every packed message; its JSON is cached, and the
    message decodes to what was sent, also after the cache changed, and with unhashable arguments."""
    from comgra_callbacks.store import messages as m

    meta = m.StepMeta(3, "train", 0, 3, 1.5, "schedule")
    layout = tuple(m.PackedItem(f"n{i}", None, 0, "value", "float32", (4, i + 1), None if i % 2 else (2, 3)) for i in range(40))
    first = m.PackedMessage(meta, 0, 10, 40, 40, layout)
    assert m.decode(m.encode(first)) == first
    other = m.PackedMessage(meta, 8, 10, 48, 40, layout[:-1] + (m.PackedItem("last", "r", 2, "grad", "bfloat16", None, (1,)),))
    assert m.decode(m.encode(other)) == other and m.decode(m.encode(first)) == first
    op = m.OpMessage("add_notes", tuple([{"step": i, "text": "x"} for i in range(20)]))
    assert m.decode(m.encode(op)) == op
