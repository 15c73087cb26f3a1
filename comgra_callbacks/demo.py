"""The demo behind ``make demo``: train a small model with ComgraCallback, then open the dashboard on it.

    python -m comgra_callbacks.demo                 # train ~300 steps, print where the run is, serve the dashboard
    python -m comgra_callbacks.demo --no-serve      # only train and print

The task is modular addition, ``(a + b) mod p`` (the grokking toy task): two integer tokens are embedded,
concatenated and fed through an MLP. The demo records the token ids, the embeddings (one *role* per token),
every layer, two losses (cross-entropy and a weight penalty, each with its own gradient view), parameters
and their updates, and the first validation batch of every validation run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any


def build(p: int = 23, width: int = 32, hidden: int = 64, weight_penalty: float = 1e-3, seed: int = 0) -> tuple[Any, Any, Any]:
    """The model and the train / validation loaders (half of all ``p * p`` pairs each)."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from comgra_callbacks import connect, record

    class ModularAddition(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"p": p, "width": width, "hidden": hidden, "weight_penalty": weight_penalty})
            self.embed = nn.Embedding(p, width)
            self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.ReLU(), nn.Linear(hidden, p))
            connect("target", "task_loss")  # a functional loss is invisible to module hooks: say where targets go

        def forward(self, pairs: torch.Tensor) -> torch.Tensor:  # pairs: (B, 2) integer tokens
            e = self.embed(pairs)  # (B, 2, width)
            record("token_embedding", e[:, 0], role="a")
            record("token_embedding", e[:, 1], role="b")
            return self.mlp(e.reshape(e.shape[0], -1))  # (B, p) logits

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            pairs, target = batch
            task = record("task_loss", nn.functional.cross_entropy(self(pairs), target), kind="loss")
            penalty = record("weight_penalty", weight_penalty * sum(w.pow(2).sum() for w in self.parameters()), kind="loss")
            self.log("train_loss", task)
            return task + penalty

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pairs, target = batch
            logits = self(pairs)
            self.log("val_loss", nn.functional.cross_entropy(logits, target))
            self.log("val_acc", (logits.argmax(-1) == target).float().mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.5)

    generator = torch.Generator().manual_seed(seed)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    target = (pairs[:, 0] + pairs[:, 1]) % p
    order = torch.randperm(len(pairs), generator=generator)
    half = len(pairs) // 2
    train = torch.utils.data.TensorDataset(pairs[order[:half]], target[order[:half]])
    val = torch.utils.data.TensorDataset(pairs[order[half:]], target[order[half:]])
    torch.manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=generator)
    val_loader = torch.utils.data.DataLoader(val, batch_size=128)
    return ModularAddition(), train_loader, val_loader


def train(root: str, steps: int, run_name: str | None = None) -> str:
    """Train the demo model with the callback; returns the run's path."""
    import lightning.pytorch as pl

    from comgra_callbacks import ComgraCallback

    model, train_loader, val_loader = build()
    callback = ComgraCallback(root, run_name=run_name, every_n_steps=5, val_batches=1, n_samples=8)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        val_check_interval=50,
        check_val_every_n_epoch=None,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(model, train_loader, val_loader)
    return str(Path(root) / callback.run_name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="comgra_runs", help="directory holding the runs (default: comgra_runs)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--run-name", default=None, help="name of the run (default: a new unique name)")
    parser.add_argument("--no-serve", action="store_true", help="do not start the dashboard afterwards")
    parser.add_argument("--port", type=int, default=5006, help="dashboard port (default: 5006)")


def run(args: argparse.Namespace) -> int:
    """Train, say where the run is and how to open it, then serve the dashboard (unless ``--no-serve``)."""
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    path = train(args.root, args.steps, args.run_name)
    from comgra_callbacks import open_run

    recorded = open_run(path)
    print()
    print(f"Recorded {len(recorded.steps)} steps of {len(recorded.nodes)} nodes into {path} (status: {recorded.status}).")
    print("Read it from Python:")
    print("    from comgra_callbacks import open_run")
    print(f"    run = open_run({path!r})")
    print("    run.stats('mlp.0')             # batch statistics of a layer over training")
    print("    run.neurons('mlp.0', step=100) # per-neuron statistics at one step")
    print(f"Explore it in the dashboard:  comgra-callbacks serve {args.root}")
    if args.no_serve:
        return 0
    from comgra_callbacks import cli

    print(f"Starting the dashboard on http://127.0.0.1:{args.port}/ (Ctrl+C to stop) ...", flush=True)
    return cli.main(["serve", args.root, "--port", str(args.port), "--no-show"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comgra_callbacks.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
