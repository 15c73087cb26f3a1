"""What ``attribution=`` costs a recorded step: ``python benchmarks/attribution_bench.py [--steps 40]``.

A small transformer LM (2 blocks, width 128, MLP 512, 64 tokens, batch 16, AdamW, CPU, one thread) is trained
with every step recorded (statistics and per-neuron statistics), without ``attribution``, with it on every
MLP weight (``blocks.*.mlp.*.weight``) keeping the factors (the default), and with it keeping contributions
only (``attribution_keep="contributions"``), in interleaved rounds. Reported: the median time of a recorded
step in each configuration, the ratios to the step without, the bytes each configuration's run takes on disk
per recorded step, the
writer process's CPU time per step (what competes with training for the cores), each round's medians and
the machine's load average (1 min) before and after (the figures are only comparable at a
similar load).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
VOCAB, T, D, B = 512, 64, 128, 16


class Block(nn.Module):
    def __init__(self, d: int, heads: int = 4) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.ModuleDict({"fc": nn.Linear(d, 4 * d), "proj": nn.Linear(4 * d, d)})
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp["proj"](torch.relu(self.mlp["fc"](self.ln2(x))))


def lm_module() -> Any:
    import lightning.pytorch as pl

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.pos = nn.Embedding(VOCAB, D), nn.Parameter(torch.zeros(T, D))
            self.blocks = nn.ModuleList([Block(D), Block(D)])
            self.head = nn.Linear(D, VOCAB)
            self.times: list[float] = []
            self.cpu_times: list[float] = []

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())  # the training process's CPU (all its threads): less load-bound

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            w = batch["tokens"]
            x = self.emb(w[:, :-1]) + self.pos
            for block in self.blocks:
                x = block(x)
            return nn.functional.cross_entropy(self.head(x).reshape(-1, VOCAB), w[:, 1:].reshape(-1))

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return LM()


CONFIGS = {"none": {}, "factors": {"attribution": "blocks.*.mlp.*.weight"},
           "contributions": {"attribution": "blocks.*.mlp.*.weight", "attribution_keep": "contributions"}}


def run_once(config: str, steps: int, root: Path, name: str) -> tuple[float, int, float, float]:
    import lightning.pytorch as pl

    from comgra_callbacks import ComgraCallback

    g = torch.Generator().manual_seed(1)
    data = [{"tokens": torch.randint(0, VOCAB, (T + 1,), generator=g), "idx": i} for i in range(steps * B)]
    callback = ComgraCallback(str(root), run_name=name, **CONFIGS[config])
    module = lm_module()
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=B))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the writer process, reaped when the run closed
    module.writer_cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / steps
    gaps = [b - a for a, b in zip(module.times, module.times[1:])][5:]  # the first steps warm up
    cpu_gaps = [b - a for a, b in zip(module.cpu_times, module.cpu_times[1:])][5:]
    size = sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
    return statistics.median(gaps), size // steps, module.writer_cpu, statistics.median(cpu_gaps)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    sizes: dict[str, int] = {}
    cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    train_cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for config in CONFIGS:
                t, size, writer_cpu, training_cpu = run_once(config, args.steps, Path(tmp), f"r{r}_{config}")
                times[config].append(t)
                train_cpu[config].append(training_cpu)
                cpu[config].append(writer_cpu)
                sizes[config] = size
    median = {c: statistics.median(times[c]) for c in CONFIGS}
    result = {
        "recorded_step_ms": {c: round(median[c] * 1e3, 2) for c in CONFIGS},
        "ratio": {c: round(median[c] / median["none"], 3) for c in CONFIGS if c != "none"},
        "bytes_per_step": sizes,
        "writer_cpu_ms_per_step": {c: round(statistics.median(cpu[c]) * 1e3, 1) for c in CONFIGS},
        "training_cpu_ms_per_step": {c: round(statistics.median(train_cpu[c]) * 1e3, 1) for c in CONFIGS},
        "rounds_ms": [{c: round(times[c][r] * 1e3, 1) for c in CONFIGS} for r in range(args.rounds)],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
