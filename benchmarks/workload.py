"""The fixed, seeded workload shared by every benchmark script.

All benchmark scripts (ours and the reference run of the original ``comgra``
package, which lives in a separate virtual environment) train exactly this
workload, so their per-step timings can be compared directly:

* a 4-layer MLP 64 -> 256 -> 256 -> 256 -> 10 (``nn.Sequential`` of ``Linear``
  layers with a ``ReLU`` between consecutive layers),
* batches of 64 synthetic samples whose labels come from a fixed random linear
  "teacher", so the task is learnable and the loss actually goes down,
* Adam (lr 1e-3), cross-entropy loss, CPU only, one intra-op thread,
* ``N_STEPS`` steps, the first ``WARMUP`` of which are excluded from medians.

This module imports nothing but ``torch`` so that it can be imported from any
environment that has PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

N_STEPS: int = 300
BATCH_SIZE: int = 64
WARMUP: int = 20
IN_FEATURES: int = 64
HIDDEN: int = 256
N_CLASSES: int = 10
LR: float = 1e-3


def configure_torch() -> None:
    """Pins PyTorch to a single CPU thread so timings are stable and comparable."""
    torch.set_num_threads(1)


def make_model(seed: int = 0) -> nn.Sequential:
    """Builds the benchmark MLP with deterministic initial weights.

    Args:
        seed: Seed for the weight initialisation.

    Returns:
        ``Sequential(Linear, ReLU, Linear, ReLU, Linear, ReLU, Linear)``; modules are
        named ``"0"`` .. ``"6"`` as usual for ``nn.Sequential``.
    """
    configure_torch()
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN),  # [B, 64] -> [B, 256]
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),  # [B, 256] -> [B, 256]
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),  # [B, 256] -> [B, 256]
        nn.ReLU(),
        nn.Linear(HIDDEN, N_CLASSES),  # [B, 256] -> [B, 10] logits
    )


def make_batches(n_steps: int = N_STEPS, batch_size: int = BATCH_SIZE, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Generates the synthetic training batches, one per step.

    Inputs are standard normal; labels are the argmax of a fixed random linear
    teacher applied to the inputs. Call this again for every run: recorders may
    flip ``requires_grad`` on the input tensors they are given.

    Args:
        n_steps: Number of batches (one per training step).
        batch_size: Samples per batch.
        seed: Seed for inputs and teacher; independent of the model seed.

    Returns:
        A list of ``(x, y)`` with ``x`` float32 ``[batch_size, 64]`` and ``y`` int64 ``[batch_size]``.
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN_FEATURES, N_CLASSES, generator=gen)  # [64, 10]
    x_all = torch.randn(n_steps, batch_size, IN_FEATURES, generator=gen)  # [S, B, 64]
    y_all = (x_all @ teacher).argmax(dim=-1)  # [S, B]
    return [(x_all[i].clone(), y_all[i].clone()) for i in range(n_steps)]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Returns the benchmark optimizer: Adam with lr 1e-3."""
    return torch.optim.Adam(model.parameters(), lr=LR)


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` ``[B, 10]`` against labels ``y`` ``[B]``; returns a scalar."""
    return nn.functional.cross_entropy(logits, y)


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """Runs one un-instrumented training step.

    Args:
        model: The benchmark MLP.
        opt: Its optimizer.
        x: Inputs ``[B, 64]``.
        y: Labels ``[B]``.

    Returns:
        The detached scalar loss of this step (computed before the update).
    """
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()
