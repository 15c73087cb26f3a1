"""The model's module tree, as stored with a run (``modules.json``), and which modules only hold others."""

from __future__ import annotations

from typing import Any

from comgra_callbacks.recording.capture import clean_name


def is_container(module: Any) -> bool:
    """Modules that only hold others (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``, the wrapper of
    ``torch.compile``): an output they pass on from a child is nothing new."""
    import torch

    return isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)) or type(module).__name__ == "OptimizedModule"


def module_tree(model: Any) -> list[dict[str, Any]]:
    """The module tree with parameter counts, one row per module (``""`` is the root), named as the nodes
    are (without ``torch.compile``'s ``_orig_mod``)."""
    own: dict[str, tuple[int, int]] = {}
    rows: list[dict[str, Any]] = []
    for raw, module in model.named_modules():
        name = clean_name(raw)
        if type(module).__name__ == "OptimizedModule" or name in own:
            continue  # the wrapper of torch.compile: its inner module takes its name
        params = list(module.parameters(recurse=False))
        own[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
        rows.append({"name": name, "type": type(module).__name__, "parent": None if not name else name.rpartition(".")[0], "depth": 0 if not name else name.count(".") + 1})
    for row in rows:
        name = str(row["name"])
        prefix = f"{name}." if name else ""
        total = [v for n, v in own.items() if n == name or n.startswith(prefix)]
        row["params"] = own[name][0]
        row["params_total"] = sum(v[0] for v in total)
        row["trainable_total"] = sum(v[1] for v in total)
    return rows
