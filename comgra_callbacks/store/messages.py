"""The messages a run's writer takes, typed and versioned, and their wire format (one JSON line each).

Both transports carry the same messages to the one writer loop (:class:`~comgra_callbacks.store.sink.Worker`):
the thread writer (``store/background.py``) hands them over in memory, the writer process
(``recording/worker.py``) reads them from its standard input, where :func:`encode` / :func:`decode` are the
only code that knows how they look. Each is a frozen dataclass with a ``version``: a field added or renamed
raises the version, and a writer that meets a version it does not know says so (:class:`FormatVersionError`)
instead of reading a field at the wrong index, which is how the 12-field positional lists that crossed
before could break silently.

On the wire a message is an object with its ``type`` and fields by name; the items of a layout (which repeat
for every tensor of a step) are lists in their dataclass's field order, checked for length when decoded.
The writer process answers its start the same way, on its standard output: :class:`ReadyAnswer` or
:class:`ErrorAnswer` (:func:`decode_answer` reads them). Nothing here imports torch: the writer process never does.

>>> msg = FlushMessage(3)
>>> decode(encode(msg)) == msg
True
>>> encode(CloseMessage("finished"))
b'\\n{"type":"close","version":2,"status":"finished","error":null}\\n'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from comgra_callbacks.errors import FormatVersionError, StoreError

VERSION = 2  # 2: RawItem.subtract
# Sidecar operations a writer runs (``RunWriter.<name>(*args)``), in order with the records.
OPS = frozenset({"write_graph", "write_modules", "add_notes", "add_scalars", "start_segment", "update_meta", "commit"})
FULL = -1  # RawItem.samples: keep the whole tensor


@dataclass(frozen=True)
class StepMeta:
    """Where a recorded step is in training (the columns of the ``records`` index)."""

    step: int
    step_type: str
    epoch: int
    batch_idx: int
    time: float
    reason: str


@dataclass(frozen=True)
class RawItem:
    """One tensor of a record whose raw values are in the ring, and what the writer keeps of it.

    ``dtype`` is the recorded tensor's dtype name, ``ring_dtype`` how its values lie in the ring (dtypes numpy
    lacks travel as float32); ``offset`` is relative to the record's ``base``; ``samples`` is 0 (none), a
    count of leading samples, or ``FULL``; ``reference`` is, for an update, the index of its weight's item
    in the same layout (``-1``: the weight travels in another part of the step; None: no ratio);
    ``subtract``: the index of an item in the same layout whose values are subtracted from this one's before
    anything is computed (an update that travels as the weight after the step, minus the weight before it).
    """

    node: str
    role: str | None
    iteration: int
    view: str
    dtype: str
    ring_dtype: str
    shape: tuple[int, ...]
    offset: int
    is_parameter: bool
    neurons: bool
    samples: int
    reference: int | None
    neuron_axis: int | None
    subtract: int | None = None


@dataclass(frozen=True)
class PackedItem:
    """One series of a record reduced before it travelled: where its per-neuron statistics and samples are
    in the record's float32 buffer (after the ``(series, n_stats)`` block of batch statistics)."""

    node: str
    role: str | None
    iteration: int
    view: str
    dtype: str
    neuron_shape: tuple[int, ...] | None
    sample_shape: tuple[int, ...] | None


@dataclass(frozen=True)
class StartMessage:
    """The first message to a writer process: which run it opens and how it blocks records."""

    root: str
    run: str
    storage_options: dict[str, Any] | None
    resume: bool
    meta: dict[str, Any]
    flush_rows: int
    flush_bytes: int
    flush_secs: float
    load_kernel: bool = False  # large raw records will come: load the one-pass kernel before answering
    version: int = VERSION


@dataclass(frozen=True)
class LayoutMessage:
    """The tensors of a raw record, described once and named by ``id`` (a step's tensors repeat every step)."""

    id: int
    items: tuple[RawItem, ...]
    version: int = VERSION


@dataclass(frozen=True)
class PackedLayoutMessage:
    """The series of a packed record, described once and named by ``id`` (one counter with
    :class:`LayoutMessage`'s ids): a transformer's ~200 series decoded from JSON cost the writer process
    ~1.8 ms a record when they came with every :class:`PackedMessage`."""

    id: int
    items: tuple[PackedItem, ...]
    version: int = VERSION


@dataclass(frozen=True)
class RecordMessage:
    """A step (or ``part`` of one; ``more`` on all but the last) whose raw tensors are in the ring from
    ``base``, laid out as layout ``layout`` says; ``end`` is the ring's produced counter after it (what the
    writer marks consumed once it took the record)."""

    meta: StepMeta
    layout: int
    base: int
    end: int
    nbytes: int
    batch_size: int | None = None
    sample_index: tuple[int, ...] | None = None
    part: int = 0
    more: bool = False
    version: int = VERSION


@dataclass(frozen=True)
class PackedMessage:
    """A step (or a part of one) already reduced: ``length`` float32 values in the ring from ``offset``;
    ``layout``: its series, or the id of a :class:`PackedLayoutMessage` that described them."""

    meta: StepMeta
    offset: int
    length: int
    end: int
    nbytes: int
    layout: tuple[PackedItem, ...] | int
    part: int = 0
    more: bool = False
    version: int = VERSION


@dataclass(frozen=True)
class OpMessage:
    """A sidecar operation, ``RunWriter.<name>(*args)``; ``name`` is one of :data:`OPS`."""

    name: str
    args: tuple[Any, ...] = ()
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.name not in OPS:
            raise StoreError(f"`OpMessage(name={self.name!r})`: expected one of {sorted(OPS)}, got {self.name!r}.")


@dataclass(frozen=True)
class FlushMessage:
    """Commit everything received before this message, then acknowledge ``id``."""

    id: int
    version: int = VERSION


@dataclass(frozen=True)
class CloseMessage:
    """Commit everything, mark the run ``status`` (with ``error``), stop."""

    status: str
    error: str | None = None
    version: int = VERSION


@dataclass(frozen=True)
class ReadyAnswer:
    """The writer process's answer to its :class:`StartMessage` (on its standard output): the run is open."""

    version: int = VERSION


@dataclass(frozen=True)
class ErrorAnswer:
    """The writer process's answer when it could not open the run: the error's text and its class name."""

    error: str
    error_type: str
    version: int = VERSION


Message = StartMessage | LayoutMessage | PackedLayoutMessage | RecordMessage | PackedMessage | OpMessage | FlushMessage | CloseMessage
Answer = ReadyAnswer | ErrorAnswer
_TYPES: dict[str, type] = {
    "start": StartMessage, "layout": LayoutMessage, "packed_layout": PackedLayoutMessage, "record": RecordMessage, "packed": PackedMessage,
    "op": OpMessage, "flush": FlushMessage, "close": CloseMessage,
}
_ANSWERS: dict[str, type] = {"ready": ReadyAnswer, "error": ErrorAnswer}  # the other way: writer to trainer
_NAMES = {cls: name for name, cls in (*_TYPES.items(), *_ANSWERS.items())}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in (*_NAMES, StepMeta, RawItem, PackedItem)}


def _shape(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


def _item(cls: type, value: Any, **convert: Any) -> Any:
    """A nested item from its list of field values (in field order); ``convert`` maps a field to the
    function that turns its JSON value back (shapes are tuples)."""
    names = _FIELDS[cls]
    if not isinstance(value, list) or len(value) != len(names):
        raise StoreError(f"`decode`: expected a {cls.__name__} as a list of {len(names)} values {names}, got {value!r}.")
    values = dict(zip(names, value))
    for name, function in convert.items():
        values[name] = function(values[name])
    return cls(**values)


def _raw_item(value: Any) -> RawItem:
    return _item(RawItem, value, shape=_shape)


def _packed_item(value: Any) -> PackedItem:
    return _item(PackedItem, value, neuron_shape=_shape, sample_shape=_shape)


# how a field that is not a plain JSON value comes back
_DECODE: dict[str, Any] = {
    "meta": lambda v, cls: _item(StepMeta, v) if cls in (RecordMessage, PackedMessage) else v,
    "items": lambda v, cls: tuple((_packed_item if cls is PackedLayoutMessage else _raw_item)(x) for x in v),
    "layout": lambda v, cls: tuple(_packed_item(x) for x in v) if cls is PackedMessage and isinstance(v, list) else v,
    "sample_index": lambda v, cls: None if v is None else tuple(int(x) for x in v),
    "args": lambda v, cls: tuple(v),
}


def _wire(value: Any) -> Any:
    """A field's JSON value: nested items as lists of their fields, tuples as lists."""
    names = _FIELDS.get(type(value))
    if names is not None:
        return [_wire(getattr(value, n)) for n in names]
    if isinstance(value, tuple):
        return [_wire(v) for v in value]
    return value


def encode(message: Message | Answer) -> bytes:
    """One message as one JSON line. It starts with a newline too: a line torn by an interrupt while it was
    written ends at the next message, and the reader skips just that one."""
    if type(message) is RecordMessage and (message.sample_index is None or len(message.sample_index) < _LONG):
        return _encode_record(message)
    return _encode(message)


def _encode_record(m: RecordMessage) -> bytes:
    """A recorded step's message, the one sent every step, written out field by field: the same bytes as
    :func:`_encode` (held to it by tests/test_messages_encode.py) in under half its time (4 against 9.5 us in
    ``timeit``; in the training step, where Python's code and data come from memory, 37-49 against 57-96 us)."""
    j, meta = _scalar, m.meta
    index = "null" if m.sample_index is None else "[" + ",".join(map(j, m.sample_index)) + "]"
    text = (
        f'\n{{"type":"record","version":{j(m.version)},"meta":[{j(meta.step)},{j(meta.step_type)},{j(meta.epoch)},'
        f'{j(meta.batch_idx)},{j(meta.time)},{j(meta.reason)}],"layout":{j(m.layout)},"base":{j(m.base)},"end":{j(m.end)},'
        f'"nbytes":{j(m.nbytes)},"batch_size":{j(m.batch_size)},"sample_index":{index},"part":{j(m.part)},"more":{j(m.more)}}}\n'
    )
    return text.encode()


_STRINGS: dict[str, str] = {}  # step types and reasons: a few, the same every step


def _scalar(value: Any) -> str:
    """One JSON value as ``json.dumps`` writes it (``allow_nan``), quicker for the usual ints and strings."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is str:
        text = _STRINGS.get(value)
        if text is None:
            text = json.dumps(value)
            if len(_STRINGS) < 64:
                _STRINGS[value] = text
        return text
    if kind is float and value - value == 0.0:  # finite: json writes float.__repr__
        return float.__repr__(value)
    if value is None:
        return "null"
    return json.dumps(value, allow_nan=True)


def _encode(message: Message | Answer) -> bytes:
    """Any message (see :func:`encode`)."""
    cls = type(message)
    if cls not in _NAMES:
        raise StoreError(f"`encode`: expected one of {sorted(c.__name__ for c in _NAMES)}, got {cls.__name__}.")
    body: dict[str, Any] = {"type": _NAMES[cls], "version": message.version}
    long: list[str] = []  # the layout of a step: the same every step, encoded once (_long_field)
    for name in _FIELDS[cls]:
        value = getattr(message, name)
        if isinstance(value, tuple) and len(value) >= _LONG:
            long.append(f',"{name}":{_long_field(value)}')
        elif name != "version":
            body[name] = _wire(value)
    text = json.dumps(body, separators=(",", ":"), allow_nan=True)
    if long:
        text = text[:-1] + "".join(long) + "}"
    return b"\n" + text.encode() + b"\n"


_LONG = 16  # a tuple field this long (a step's layout) is encoded once and reused
_LONG_KEPT = 8
_LONG_CACHE: dict[tuple[Any, ...], str] = {}


def _long_field(value: tuple[Any, ...]) -> str:
    """The JSON of a long tuple field, from a small cache: a recorded step sends the layout of its ~200
    tensors with every message, and turning it into JSON cost ~4 ms a step."""
    try:
        text = _LONG_CACHE.get(value)
    except TypeError:  # something unhashable in it (not a layout): encoded every time
        return json.dumps(_wire(value), separators=(",", ":"), allow_nan=True)
    if text is None:
        text = json.dumps(_wire(value), separators=(",", ":"), allow_nan=True)
        if len(_LONG_CACHE) >= _LONG_KEPT:
            _LONG_CACHE.pop(next(iter(_LONG_CACHE)))
        _LONG_CACHE[value] = text
    return text


def decode(line: bytes | str) -> Message:
    """The message of one JSON line.

    Raises:
        ValueError: the line is not JSON (a message torn by an interrupt: skip it).
        FormatVersionError: the message has a version this code does not read.
        StoreError: the line is JSON but not a message (an unknown type or missing fields).
    """
    return _decode(json.loads(line), _TYPES, "decode", "a message", "this writer")


def decode_answer(line: bytes | str) -> Answer:
    """The writer process's answer to its start, from its line: a :class:`ReadyAnswer` or an :class:`ErrorAnswer`.

    Raises:
        FormatVersionError: the answer has a version this code does not read.
        StoreError: the line is not an answer (not JSON, another type, missing or extra fields).

    >>> decode_answer(encode(ErrorAnswer("no space left", "OSError")))
    ErrorAnswer(error='no space left', error_type='OSError', version=2)
    """
    try:
        body = json.loads(line)
    except ValueError as exc:
        raise StoreError(f"`decode_answer`: expected an answer as one JSON line, got {line!r}.") from exc
    return _decode(body, _ANSWERS, "decode_answer", "an answer", "this trainer")


def _decode(body: Any, types: dict[str, type], owner: str, what: str, reader: str) -> Any:
    """The dataclass of a parsed JSON line, one of ``types`` by its ``type``, checked for its version."""
    if not isinstance(body, dict) or body.get("type") not in types:
        kind = body.get("type") if isinstance(body, dict) else type(body).__name__
        raise StoreError(f"`{owner}`: expected {what} of type {sorted(types)}, got {kind!r}.")
    cls = types[body.pop("type")]
    named = f"{'an' if cls.__name__[0] in 'AEIOU' else 'a'} {cls.__name__}"
    version = body.get("version")
    if version != VERSION:
        raise FormatVersionError(
            f"`{owner}`: {named} of version {version!r}, but {reader} reads version {VERSION}. "
            "HINT: the training process and its writer process run different versions of comgra_callbacks; "
            "reinstall it and restart training."
        )
    try:
        return cls(**{k: _DECODE[k](v, cls) if k in _DECODE else v for k, v in body.items()})
    except TypeError as exc:
        raise StoreError(f"`{owner}`: {named} with the fields {sorted(body)}: {exc}.") from exc


def unpack_entries(flat: Any, layout: Any, *, copy: bool) -> list[Any]:
    """The entries of a packed record: the one decoder of the buffer ``pack`` lays out (``recording/pending.py``),
    used by the thread writer (views of a buffer it owns) and the writer process (``copy``: out of the ring).

    ``flat`` is a float32 numpy array: the ``(series, n_stats)`` block of batch statistics, then each series'
    per-neuron statistics and samples, in order; ``layout`` gives, per series, ``(key, dtype, neuron_shape,
    sample_shape)`` (a shape None: not kept). Returns ``HostEntry`` objects.

    >>> import numpy as np
    >>> from comgra_callbacks.stats import N_STATS
    >>> from comgra_callbacks.store.format import SeriesKey
    >>> flat = np.arange(N_STATS + 6, dtype=np.float32)
    >>> [entry] = unpack_entries(flat, [(SeriesKey("a", None, 0, "value"), "float32", None, (2, 3))], copy=False)
    >>> entry.samples.tolist()
    [[11.0, 12.0, 13.0], [14.0, 15.0, 16.0]]
    """
    import math

    from comgra_callbacks.stats import N_STATS
    from comgra_callbacks.store.writer import HostEntry

    n = len(layout)
    stats_block = flat[: n * N_STATS].reshape(n, N_STATS)
    if copy:
        stats_block = stats_block.copy()
    offset = n * N_STATS
    entries = []
    for i, (key, dtype, neuron_shape, sample_shape) in enumerate(layout):
        pieces: list[Any] = []
        for shape in (neuron_shape, sample_shape):
            if shape is None:
                pieces.append(None)
                continue
            size = math.prod(shape)
            piece = flat[offset : offset + size].reshape(shape)
            pieces.append(piece.copy() if copy else piece)
            offset += size
        entries.append(HostEntry(key, stats_block[i], pieces[0], pieces[1], str(dtype)))
    return entries
