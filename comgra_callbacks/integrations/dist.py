"""Agreeing across processes without a training framework: ``torch.distributed`` when it is initialised.

Lightning has ``strategy.broadcast``; the HuggingFace ``Trainer`` gives callbacks no such thing, but it runs
under ``torch.distributed`` (set up by accelerate) whenever there is more than one process. On a single
process every function here is the identity, and nothing is imported that training has not imported already.

>>> broadcast_object("run-name")   # one process: nothing to agree on
'run-name'
>>> all_ok(True), all_ok(False)
(True, False)
"""

from __future__ import annotations

from typing import Any


def _group_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small JSON-like value: a run name, an error message)."""
    if _group_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ok(ok: bool) -> bool:
    """True on every rank when every rank passed True."""
    if _group_size() == 1:
        return bool(ok)
    import torch.distributed as dist

    votes: list[Any] = [None] * _group_size()
    dist.all_gather_object(votes, bool(ok))
    return all(bool(vote) for vote in votes)
