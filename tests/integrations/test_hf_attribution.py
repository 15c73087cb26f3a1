"""``attribution=`` with a real ``transformers.Trainer``: per-sample factors of a tiny BERT's MLP weights,
the dataset index as a model input, AdamW's preconditioner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from comgra_callbacks import ComgraTrainerCallback, open_run
from comgra_callbacks.analysis import contributions

from .tiny_hf import SEQ, MaskedTokens, tiny_bert, training_args

WEIGHT = "bert.encoder.layer.0.intermediate.dense.weight"  # (64, 32): an MLP's first weight


class IndexedTokens(MaskedTokens):
    """The masked-token items with their dataset index as the field ``idx``."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "idx": torch.tensor(i)}


class IndexedBert(torch.nn.Module):
    """The tiny BERT with a ``forward`` that takes ``idx`` (the Trainer drops dataset columns it does not take)."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert().bert
        self.inner = tiny_bert()
        self.inner.bert = self.bert

    def forward(self, input_ids: Any, attention_mask: Any = None, labels: Any = None, idx: Any = None) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_trainer_records_factors_indices_and_adamw(tmp_path: Path) -> None:
    cb = ComgraTrainerCallback(tmp_path / "runs", run_name="attr", attribution="bert.encoder.layer.*.intermediate.dense.weight", flush_secs=0.1)
    args = training_args(str(tmp_path / "out"), max_steps=4, max_grad_norm=0.0)  # no clipping: the update is the gradient's
    Trainer(model=IndexedBert(), args=args, train_dataset=IndexedTokens(), callbacks=[cb]).train()
    run = open_run(tmp_path / "runs" / "attr")
    assert run.attribution_steps(WEIGHT) == [0, 1, 2, 3]
    seen = []
    for step in range(4):
        a = run.attribution(WEIGHT, step)
        assert a.inputs.shape == (4, SEQ, 32) and a.grad_outputs.shape == (4, SEQ, 64)
        assert a.optimizer == "adamw" and a.precond is not None and a.index_from_batch
        grad = a.per_sample_grads().sum(axis=0)  # the batch's gradient, from the factors
        assert np.isclose(np.linalg.norm(grad), run.stats(WEIGHT, view="grad").loc[step, "l2"], rtol=1e-4)
        seen += a.dataset_index.tolist()
    assert len(set(seen)) == 16 and all(0 <= i < 64 for i in seen)  # 16 distinct items of one shuffled epoch
    first = run.attribution(WEIGHT, 0)  # t = 1: Adam's first moment is this step's gradient alone
    shares = first.per_sample_updates().sum(axis=0)
    assert np.abs(shares - first.update).max() < 1e-3 * np.abs(first.update).max()
    frame = contributions(run, WEIGHT, 0, neuron=3)
    assert len(frame) == 4 and set(frame["dataset_index"]) <= set(seen)
    assert np.isclose(frame["contribution"].sum(), frame.attrs["update_norm"], rtol=1e-3)


def test_trainer_keeps_contributions_and_test_gradient_products(tmp_path: Path) -> None:
    """``attribution_keep="contributions"`` and a ``TestGradient`` measure under the ``Trainer``: the same
    contributions and the same influence as a run (same seed) that keeps the factors."""
    from comgra_callbacks.analysis import influence
    from comgra_callbacks.measures import TestGradient

    item = MaskedTokens()[0]
    test_batch = {k: v[None] for k, v in item.items()}
    runs = {}
    for keep in ("factors", "contributions"):
        test = TestGradient(lambda model: model(**test_batch).loss)
        cb = ComgraTrainerCallback(tmp_path / "runs", run_name=keep, attribution=WEIGHT, attribution_keep=keep, measures={"test": test}, flush_secs=0.1)
        args = training_args(str(tmp_path / f"out_{keep}"), max_steps=3, max_grad_norm=0.0)
        Trainer(model=IndexedBert(), args=args, train_dataset=IndexedTokens(), callbacks=[cb]).train()
        runs[keep] = open_run(tmp_path / "runs" / keep)
    exact, compact = runs["factors"], runs["contributions"]
    assert compact.attribution(WEIGHT, 0).keep == "contributions" and compact.attribution(WEIGHT, 0).inputs is None
    for step in range(3):
        for neuron in (3, 40):
            a, b = contributions(exact, WEIGHT, step, neuron=neuron), contributions(compact, WEIGHT, step, neuron=neuron)
            np.testing.assert_allclose(b["contribution"], a["contribution"], rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(compact.measures["test"], exact.measures["test"], rtol=1e-5)
    got, want = influence(compact, WEIGHT, "test"), influence(exact, WEIGHT, "test")
    assert got.attrs["steps"] == [0, 1, 2] and got["dataset_index"].tolist() == want["dataset_index"].tolist()
    np.testing.assert_allclose(got["influence"], want["influence"], rtol=1e-3, atol=1e-12)
