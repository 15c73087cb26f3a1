"""ComgraTrainerCallback with a real ``transformers.Trainer`` and a tiny BERT built from a config.

An oracle callback with plain torch hooks watches the same run and says what the recorder must have stored:
the first micro-batch of each recorded step, the parameter gradients the optimizer used (after clipping),
and the updates it made.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerCallback

from comgra_callbacks import ComgraTrainerCallback, MissingDependencyError, StoreError, open_run, record
from comgra_callbacks.recording import context

from .conftest import explain, run_python
from .tiny_hf import SEQ, MaskedTokens, tiny_bert, training_args

ACT = "bert.encoder.layer.1.output.dense"  # an MLP output inside the second layer
WEIGHT = "bert.encoder.layer.0.output.dense.weight"


def hooked_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


class Oracle(TrainerCallback):
    """Sees what the recorder should have seen, with plain hooks, for every optimizer step."""

    def __init__(self) -> None:
        self.forwards: dict[int, list[dict[str, Any]]] = {}  # step -> one entry per micro-batch
        self.grad_l2: dict[int, float] = {}
        self.total_grad_l2: dict[int, float] = {}
        self.update_l2: dict[int, float] = {}
        self._before: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        def before_forward(module: Any, a: Any, kwargs: Any) -> None:
            self.forwards.setdefault(self._step, []).append({"input_ids": kwargs["input_ids"].clone()})

        def after_forward(module: Any, a: Any, out: Any) -> None:
            self.forwards[self._step][-1]["loss"] = float(out.loss.detach())

        def on_act(module: Any, a: Any, out: torch.Tensor) -> None:
            entry = self.forwards[self._step][-1]
            entry["other_hooks"] = len(module._forward_hooks) - 1  # the recorder's, besides this one
            out.register_hook(lambda g: entry.__setitem__("act_grad_l2", float(g.norm())))

        self._handles = [
            model.register_forward_pre_hook(before_forward, with_kwargs=True),
            model.register_forward_hook(after_forward),
            model.get_submodule(ACT).register_forward_hook(on_act),
        ]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._step = state.global_step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        weight = model.get_parameter(WEIGHT)
        self.grad_l2[self._step] = float(weight.grad.norm())
        self.total_grad_l2[self._step] = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)))
        self._before = weight.detach().clone()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.update_l2[self._step] = float((model.get_parameter(WEIGHT).detach() - self._before).norm())

    def on_train_end(self, *a: Any, **kw: Any) -> None:
        for handle in self._handles:
            handle.remove()


def test_records_first_micro_batch_and_clipped_gradients(tmp_path: Path) -> None:
    model = tiny_bert()
    cb = ComgraTrainerCallback(tmp_path / "runs", run_name="bert", every_n_steps=2, n_samples=4, flush_secs=0.1)
    oracle = Oracle()
    args = training_args(str(tmp_path / "out"), max_steps=5, gradient_accumulation_steps=2, max_grad_norm=0.5)
    Trainer(model=model, args=args, train_dataset=MaskedTokens(), callbacks=[cb, oracle]).train()

    assert hooked_modules(model) == [] and context.active_recorders() == []
    run = open_run(tmp_path / "runs" / "bert")
    assert run.status == "finished"
    assert (run.meta["framework"], run.meta["rank"], run.meta["world_size"]) == ("transformers", 0, 1)
    assert list(run.steps["step"]) == [0, 2, 4] and set(run.steps["step_type"]) == {"train"}
    assert list(run.steps["batch_idx"]) == [0, 4, 8]  # the first micro-batch of optimizer steps 0, 2, 4

    kinds = {name: attrs["kind"] for name, attrs in run.graph.nodes(data=True)}
    assert kinds["batch.input_ids"] == kinds["batch.attention_mask"] == "input"
    assert kinds["batch.labels"] == "target" and kinds["loss"] == "loss"
    assert kinds["cls.predictions.decoder"] == "output"  # the logits: consumed by the loss only
    for node in ("bert.embeddings.word_embeddings", "bert.encoder.layer.0.attention.output.LayerNorm",
                 "bert.encoder.layer.0.intermediate.dense", ACT):
        assert kinds[node] == "intermediate"
    assert "num_items_in_batch" not in " ".join(run.nodes)
    edges = set(run.graph.edges)
    assert ("batch.labels", "loss") in edges
    # the logits have two names: cls.predictions ran two children (transform, decoder) and returns the decoder's
    # output; cls only wraps cls.predictions and adds nothing
    assert {("cls.predictions.decoder", "cls.predictions"), ("cls.predictions", "loss")} <= edges and "cls" not in run.nodes
    assert run.graph.edges["cls.predictions.decoder", "cls.predictions"]["source"] == "same"
    assert ("bert.embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings") in edges

    loss = run.stats("loss")["mean"]
    act_grad = run.stats(ACT, view="grad")["l2"]
    grad = run.stats(WEIGHT, view="grad")["l2"]
    update = run.stats(WEIGHT, view="update")["l2"]
    scalars = run.scalars.pivot_table(index="step", columns="name", values="value")
    hooks = {step: [f["other_hooks"] for f in forwards] for step, forwards in oracle.forwards.items()}
    assert hooks == {0: [1, 0], 1: [0, 0], 2: [1, 0], 3: [0, 0], 4: [1, 0]}  # only the recorded forward
    for step in (0, 2, 4):
        first, second = oracle.forwards[step]  # two micro-batches per optimizer step
        assert run.iterations(ACT) == [0]  # the second micro-batch was not captured
        np.testing.assert_array_equal(run.samples("batch.input_ids", step), first["input_ids"].numpy())
        assert not torch.equal(first["input_ids"], second["input_ids"])
        assert math.isclose(loss[step], first["loss"], rel_tol=1e-5)
        assert math.isclose(act_grad[step], first["act_grad_l2"], rel_tol=1e-4)
        assert not math.isclose(act_grad[step], second["act_grad_l2"], rel_tol=1e-2)
        assert math.isclose(grad[step], oracle.grad_l2[step], rel_tol=1e-5)
        assert math.isclose(update[step], oracle.update_l2[step], rel_tol=1e-4)
        # after clipping: the recorded gradients have the clipped norm; the Trainer logged the norm before
        recorded_total = math.sqrt(sum(run.stats(p, view="grad")["l2"][step] ** 2 for p in run.nodes if run.graph.nodes[p]["kind"] == "parameter"))
        assert math.isclose(recorded_total, 0.5, rel_tol=1e-3) and math.isclose(oracle.total_grad_l2[step], 0.5, rel_tol=1e-3)
        assert scalars.loc[step, "grad_norm"] > 1.0  # stamped with the step it belongs to


class PerPositionBert(torch.nn.Module):
    """Wraps a BERT and records its logits once per token position, one role per position."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_bert()
        self.config = self.inner.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        for position in range(out.logits.shape[1]):
            record("logits_by_position", out.logits[:, position], role=str(position))  # (B, vocab)
        return out


def test_per_token_roles_through_record(tmp_path: Path) -> None:
    detail = {"inner.cls.predictions.decoder": "samples", "logits_by_position": "samples"}
    cb = ComgraTrainerCallback(tmp_path / "runs", run_name="roles", every_n_steps=3, n_samples=4, flush_secs=0.1, detail=detail)
    Trainer(model=PerPositionBert(), args=training_args(str(tmp_path / "out"), max_steps=4), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    run = open_run(tmp_path / "runs" / "roles")
    assert run.roles("logits_by_position") == [str(i) for i in range(SEQ)]
    assert run.graph.nodes["logits_by_position"]["roles"] == [str(i) for i in range(SEQ)]
    for step in (0, 3):
        logits = run.samples("inner.cls.predictions.decoder", step)  # (B, SEQ, vocab)
        for position in (0, 5, SEQ - 1):
            np.testing.assert_array_equal(run.samples("logits_by_position", step, role=str(position)), logits[:, position])


def test_records_evaluation_batches_inside_train(tmp_path: Path) -> None:
    model = tiny_bert()
    cb = ComgraTrainerCallback(tmp_path / "runs", run_name="val", every_n_steps=100, val_batches=2, flush_secs=0.1)
    args = training_args(str(tmp_path / "out"), max_steps=4, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    Trainer(model=model, args=args, train_dataset=MaskedTokens(), eval_dataset=MaskedTokens(16), callbacks=[cb]).train()
    run = open_run(tmp_path / "runs" / "val")
    val = run.steps[run.steps["step_type"] == "val"]
    assert list(val["step"]) == [2, 2, 4, 4] and list(val["batch_idx"]) == [0, 1, 0, 1]
    assert list(run.steps[run.steps["step_type"] == "train"]["step"]) == [0]
    assert run.stats(ACT, view="grad", step_type="val").empty  # no backward in evaluation
    assert run.stats("loss", step_type="val").index.tolist() == [2, 2, 4, 4]  # the eval loss, per batch
    assert "val" in run._graph_raw["graphs"]
    assert hooked_modules(model) == []


class FailingBert(torch.nn.Module):
    """A tiny BERT whose forward raises on its ``fail_at``-th call."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.inner, self.calls, self.fail_at = tiny_bert(), 0, fail_at
        self.config = self.inner.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        self.calls += 1
        hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if self.calls == self.fail_at:
            raise RuntimeError(f"boom at call {self.calls}")
        return hidden


def test_exception_in_a_recorded_forward_marks_the_run_failed_and_removes_hooks(tmp_path: Path) -> None:
    model = FailingBert(fail_at=4)  # step 3, recorded (every step is)
    cb = ComgraTrainerCallback(tmp_path / "runs", run_name="crash", flush_secs=0.1)
    with pytest.raises(RuntimeError, match="boom at call 4"):
        Trainer(model=model, args=training_args(str(tmp_path / "out")), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    assert hooked_modules(model) == [] and context.active_recorders() == [] and cb.recorder is None
    run = open_run(tmp_path / "runs" / "crash")
    assert run.status == "failed"
    assert run.meta["error"] == "RuntimeError: boom at call 4 (raised in the model's forward at step 3)"
    assert list(run.steps["step"]) == [0, 1, 2]  # what was recorded before the crash is kept


def test_exception_elsewhere_leaves_no_hook_and_the_next_train_closes_the_run(tmp_path: Path) -> None:
    model = FailingBert(fail_at=4)  # step 3, not recorded: no hook is attached then
    cb = ComgraTrainerCallback(tmp_path / "runs", run_name="crash", every_n_steps=2, flush_secs=0.1)
    with pytest.raises(RuntimeError, match="boom at call 4"):
        Trainer(model=model, args=training_args(str(tmp_path / "out")), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    assert hooked_modules(model) == []
    assert cb.recorder is not None  # no event tells the callback; the run stays open until the next train()
    model.fail_at = -1
    Trainer(model=model, args=training_args(str(tmp_path / "out"), max_steps=2), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    assert hooked_modules(model) == [] and context.active_recorders() == []
    run = open_run(tmp_path / "runs" / "crash")
    assert run.status == "finished" and len(run.manifest.segments) == 2  # the second train() continued it
    assert list(run.records["step"]) == [0, 2, 0]


UNCAUGHT = """
import sys
import torch
from transformers import Trainer, TrainerCallback
from tiny_hf import MaskedTokens, tiny_bert, training_args
from comgra_callbacks import ComgraTrainerCallback

class Stop(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            raise ValueError("stopped by a callback at step 2")

cb = ComgraTrainerCallback("runs", run_name="uncaught", flush_secs=0.1)
Trainer(model=tiny_bert(), args=training_args("out"), train_dataset=MaskedTokens(), callbacks=[cb, Stop()]).train()
"""


@pytest.mark.slow
def test_uncaught_exception_outside_forward_marks_the_run_failed_at_exit(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(UNCAUGHT)
    proc = run_python(["script.py"], cwd=tmp_path)
    assert proc.returncode == 1 and "stopped by a callback at step 2" in proc.stderr, explain(proc)
    run = open_run(tmp_path / "runs" / "uncaught")
    assert run.status == "failed", explain(proc)
    assert run.meta["error"] == "training did not finish: ValueError: stopped by a callback at step 2"
    assert list(run.steps["step"]) == [0, 1]


def test_unwritable_root_fails_before_the_first_step(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    cb = ComgraTrainerCallback(blocker / "runs")
    with pytest.raises(StoreError, match=r"cannot create the store root .*file/runs"):
        Trainer(model=model, args=training_args(str(tmp_path / "out")), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert hooked_modules(model) == [] and cb.recorder is None


def test_an_existing_run_name_fails_before_the_first_step(tmp_path: Path) -> None:
    first = ComgraTrainerCallback(tmp_path / "runs", run_name="taken")
    Trainer(model=tiny_bert(), args=training_args(str(tmp_path / "out"), max_steps=1), train_dataset=MaskedTokens(), callbacks=[first]).train()
    trainer = Trainer(
        model=tiny_bert(), args=training_args(str(tmp_path / "out")), train_dataset=MaskedTokens(),
        callbacks=[ComgraTrainerCallback(tmp_path / "runs", run_name="taken")],
    )
    with pytest.raises(StoreError, match=r"a run already exists at .*taken'\. HINT: choose another `run_name`"):
        trainer.train()
    assert trainer.state.global_step == 0 and context.active_recorders() == []
    assert open_run(tmp_path / "runs" / "taken").status == "finished"  # the first run is untouched


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import comgra_callbacks

    monkeypatch.setitem(sys.modules, "transformers", None)  # what Python does for a package not installed
    monkeypatch.delitem(sys.modules, "comgra_callbacks.integrations.hf")
    monkeypatch.delattr(comgra_callbacks, "ComgraTrainerCallback", raising=False)  # the lazy export's cache
    with pytest.raises(
        MissingDependencyError,
        match=r"^ComgraTrainerCallback needs the optional package 'transformers'\. HINT: pip install 'comgra-callbacks\[hf\]'$",
    ):
        comgra_callbacks.ComgraTrainerCallback  # noqa: B018
    assert issubclass(MissingDependencyError, ImportError)


@pytest.mark.slow
def test_importing_the_package_does_not_import_transformers(tmp_path: Path) -> None:
    proc = run_python(["-c", "import sys, comgra_callbacks; print('transformers' in sys.modules)"], cwd=tmp_path)
    assert proc.stdout.strip() == "False", explain(proc)
    assert sys.modules["comgra_callbacks"].ComgraTrainerCallback is ComgraTrainerCallback
