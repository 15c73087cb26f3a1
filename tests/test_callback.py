"""ComgraCallback in a real Lightning Trainer: events, hooks, resume, several callbacks, bad arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from comgra_callbacks import (
    ComgraCallback,
    ConfigError,
    ConfigTypeError,
    StoreError,
    open_run,
    open_runs,
    record,
)
from tests.conftest import classification_loader, make_mlp_module, quiet_trainer


def forward_hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class Probe(pl.Callback):
    """Placed after ComgraCallback: sees what the recorder did at each event."""

    def __init__(self, comgra: ComgraCallback) -> None:
        self.comgra = comgra
        self.events: list[tuple[str, int, bool, int]] = []

    def _note(self, event: str, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        recorder = self.comgra.recorder
        recording = bool(recorder and recorder.recording)
        self.events.append((event, trainer.global_step, recording, forward_hook_count(module)))

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._note("batch_start", trainer, module)

    def on_before_backward(self, trainer: pl.Trainer, module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._note("before_backward", trainer, module)
        recorder = self.comgra.recorder
        if recorder is not None and recorder.recording:
            step = recorder._step
            assert step is not None and step.backward_loss == "loss" and step.backwarded == ["loss"]

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        self._note("before_optimizer_step", trainer, module)
        recorder = self.comgra.recorder
        if recorder is not None and recorder.recording:
            assert recorder._step is not None and recorder._step.params_done

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._note("batch_end", trainer, module)


def test_event_order_and_hooks_only_on_recorded_steps(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path / "runs"), run_name="events", every_n_steps=2)
    probe = Probe(cb)
    module = make_mlp_module()
    quiet_trainer([cb, probe], tmp_path, max_steps=4).fit(module, classification_loader())
    by_step: dict[int, list[tuple[str, bool, int]]] = {}
    for event, step, recording, hooks in probe.events:
        if event == "batch_end":
            step -= 1  # the optimizer step already advanced global_step
        by_step.setdefault(step, []).append((event, recording, hooks))
    assert [e for e, _, _ in by_step[0]] == ["batch_start", "before_backward", "before_optimizer_step", "batch_end"]
    for step, events in by_step.items():
        recorded = step % 2 == 0
        during = events[:-1]  # after batch_end the step is over either way
        assert all(rec == recorded for _, rec, _ in during), (step, events)
        assert all((hooks > 0) == recorded for _, _, hooks in during), (step, events)
        assert events[-1][1] is False and events[-1][2] == 0
    assert forward_hook_count(module) == 0
    assert open_run(tmp_path / "runs" / "events").steps["step"].tolist() == [0, 2]


class Exploding(pl.LightningModule):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
        self.fail_at = fail_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if self.global_step == self.fail_at:
            raise RuntimeError("boom in training_step")
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_exception_flushes_marks_failed_and_removes_hooks(tmp_path: Path) -> None:
    module = Exploding(fail_at=3)
    cb = ComgraCallback(str(tmp_path / "runs"), run_name="boom")
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer([cb], tmp_path, max_steps=10).fit(module, classification_loader())
    assert forward_hook_count(module) == 0
    assert cb.recorder is None
    run = open_run(tmp_path / "runs" / "boom")
    assert run.status == "failed"
    assert "boom in training_step" in run.meta["error"]
    assert run.steps["step"].tolist() == [0, 1, 2]  # everything before the failure was flushed


def test_recording_under_no_grad_eval_and_validation(tmp_path: Path) -> None:
    class Mixed(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(6, 4)
            self.head = nn.Linear(4, 3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            with torch.no_grad():
                features = self.frozen(x)
            return nn.functional.cross_entropy(self.head(features), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.head(self.frozen(x)), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    cb = ComgraCallback(str(tmp_path / "runs"), run_name="mixed", val_batches=1)
    trainer = quiet_trainer([cb], tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=2)
    trainer.fit(Mixed(), classification_loader(), classification_loader(n_batches=2))
    run = open_run(tmp_path / "runs" / "mixed")
    assert run.step_types == ["train", "val"]
    val = run.steps[run.steps["step_type"] == "val"]
    assert val["step"].tolist() == [2, 4] and val["batch_idx"].tolist() == [0, 0]  # first validation batch only
    assert run.views("frozen") == ["value"]  # computed under no_grad
    assert set(run.views("head")) == {"value", "grad"}
    assert run.stats("head", step_type="val").index.tolist() == [2, 4]
    assert run.stats("head", step_type="train").index.tolist() == [0, 1, 2, 3]
    # Step 2 has a train and a val record: step_type=None means "train", never a mix (issue 8).
    assert run.neurons("head", 2).equals(run.neurons("head", 2, step_type="train"))
    assert len(run.neurons("head", 2, step_type="val")) == 3
    assert run.graph_for("val").number_of_nodes() > 0
    # not in the optimizer: no gradient (no_grad), and an update of exactly zero
    assert set(run.views("frozen.weight")) == {"value", "update"}
    assert (run.stats("frozen.weight", view="update", step_type="train")["abs_mean"] == 0).all()


def test_parameters_that_do_not_require_grad_get_no_update(tmp_path: Path) -> None:
    module = make_mlp_module()
    module.net[0].requires_grad_(False)
    cb = ComgraCallback(str(tmp_path / "runs"), run_name="frozen")
    quiet_trainer([cb], tmp_path, max_steps=2).fit(module, classification_loader())
    run = open_run(tmp_path / "runs" / "frozen")
    assert run.views("net.0.weight") == ["value"]
    assert set(run.views("net.2.weight")) == {"value", "grad", "update"}


def test_every_n_steps_and_gradient_accumulation(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path / "runs"), run_name="acc", every_n_steps=2)
    trainer = quiet_trainer([cb], tmp_path, max_steps=5, accumulate_grad_batches=2)
    trainer.fit(make_mlp_module(), classification_loader(n_batches=12))
    run = open_run(tmp_path / "runs" / "acc")
    # one record per optimizer step, on the micro-batch that completes it
    assert run.steps["step"].tolist() == [0, 2, 4]
    assert run.steps["batch_idx"].tolist() == [1, 5, 9]


def test_nan_values_are_counted_not_fatal(tmp_path: Path) -> None:
    class Poisoned(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            out = self.lin(x)
            poisoned = out.clone()
            if self.global_step == 1:
                poisoned[0, 0] = float("nan")
                poisoned[1, 1] = float("inf")
            record("poisoned", poisoned)
            return nn.functional.cross_entropy(out, y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = ComgraCallback(str(tmp_path / "runs"), run_name="nan", detail={"poisoned": "samples"})
    quiet_trainer([cb], tmp_path, max_steps=3).fit(Poisoned(), classification_loader())
    run = open_run(tmp_path / "runs" / "nan")
    stats = run.stats("poisoned")
    assert stats.loc[1, "nan_count"] == 1 and stats.loc[1, "inf_count"] == 1
    assert stats.loc[0, "nan_count"] == 0
    finite_mean = run.samples("poisoned", 1)  # the recorded samples keep the NaN
    assert torch.isnan(torch.from_numpy(finite_mean)).sum() == 1
    assert stats.loc[1, ["mean", "std", "min", "max"]].notna().all()  # statistics of the finite values


def test_resume_from_checkpoint_continues_the_run(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)
    cb = ComgraCallback(str(root))
    quiet_trainer([cb, checkpoint], tmp_path, max_steps=5, enable_checkpointing=True).fit(make_mlp_module(), classification_loader(n_batches=20))
    first_name = cb.run_name
    state = cb.state_dict()
    assert json.loads(json.dumps(state)) == state  # JSON-safe
    ckpt = next(ckpt_dir.glob("*step=3*.ckpt"))

    resumed = ComgraCallback(str(root))  # a new process would get a new default name...
    assert resumed.run_name != first_name
    quiet_trainer([resumed, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "c2")], tmp_path, max_steps=7, enable_checkpointing=True).fit(
        make_mlp_module(), classification_loader(n_batches=20), ckpt_path=str(ckpt)
    )
    assert resumed.run_name == first_name  # ...but the checkpoint's run is continued
    assert [r.name for r in open_runs(root)] == [first_name]
    run = open_run(root / first_name)
    assert run.status == "finished"
    # records 3 and 4 of the first attempt are superseded by the resumed training
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert run.records["superseded"].sum() == 2
    assert [s["start_step"] for s in run.manifest.segments] == [0, 3]


def test_explicit_run_name_wins_over_checkpoint(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path / "runs"), run_name="fixed")
    cb.load_state_dict({"run_name": "other", "root": "x", "format_version": "1.0"})
    assert cb.run_name == "fixed"


def test_two_callbacks_in_one_trainer(tmp_path: Path) -> None:
    everything = ComgraCallback(str(tmp_path / "a"), run_name="all")
    first_layer = ComgraCallback(str(tmp_path / "b"), run_name="first", modules="net.0", parameters="net.0.*", every_n_steps=2)
    assert everything.state_key != first_layer.state_key
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    quiet_trainer([everything, first_layer, ckpt], tmp_path, max_steps=4, enable_checkpointing=True).fit(make_mlp_module(), classification_loader())
    a, b = open_run(tmp_path / "a" / "all"), open_run(tmp_path / "b" / "first")
    assert a.steps["step"].tolist() == [0, 1, 2, 3]
    assert b.steps["step"].tolist() == [0, 2]
    assert {"net.0", "net.1", "net.2"} <= set(a.nodes)
    assert set(b.nodes) == {"input", "target", "net.0", "loss", "net.0.weight", "net.0.bias"}
    saved = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=False)["callbacks"]
    assert {everything.state_key, first_layer.state_key} <= set(saved)


def test_existing_run_name_fails_before_training(tmp_path: Path) -> None:
    quiet_trainer([ComgraCallback(str(tmp_path), run_name="taken")], tmp_path, max_steps=1).fit(make_mlp_module(), classification_loader())
    module = make_mlp_module()
    with pytest.raises(StoreError, match="a run already exists .*taken.*HINT: choose another `run_name`"):
        quiet_trainer([ComgraCallback(str(tmp_path), run_name="taken")], tmp_path, max_steps=1).fit(module, classification_loader())
    assert forward_hook_count(module) == 0


def test_unwritable_root_fails_at_setup(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    module = make_mlp_module()
    with pytest.raises(StoreError, match="cannot create the store root"):
        quiet_trainer([ComgraCallback(str(blocker / "runs"))], tmp_path, max_steps=1).fit(module, classification_loader())
    assert module.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_n_steps": 0}, ConfigError, r"`ComgraCallback\(every_n_steps=...\)`: expected a positive int, got 0\."),
        ({"every_n_steps": "5"}, ConfigTypeError, r"`ComgraCallback\(every_n_steps=...\)`: expected a positive int, got '5' of type str\."),
        ({"every_n_steps": True}, ConfigTypeError, r"expected a positive int, got True of type bool"),
        ({"modules": 3}, ConfigTypeError, r"`ComgraCallback\(modules=...\)`: expected a glob string, a list of glob strings, a callable or None, got 3"),
        ({"parameters": ["net.*", 1]}, ConfigTypeError, r"`ComgraCallback\(parameters=...\)`: .* holds 1 of type int"),
        ({"run_name": "../escape"}, ConfigError, r"`ComgraCallback\(run_name=...\)`: expected letters, digits"),
        ({"n_samples": -1}, ConfigError, r"`ComgraCallback\(n_samples=...\)`: expected an int >= 0, got -1\."),
        ({"val_batches": 1.5}, ConfigTypeError, r"`ComgraCallback\(val_batches=...\)`: expected an int >= 0, got 1.5"),
        ({"on_write_error": "ignore"}, ConfigError, r"`ComgraCallback\(on_write_error=...\)`: expected one of \['warn', 'raise'\], got 'ignore'\."),
        ({"root": 5}, ConfigTypeError, r"`ComgraCallback\(root=...\)`: expected a directory path or an fsspec URL, got 5"),
        ({"flush_secs": 0}, ConfigError, r"`ComgraCallback\(flush_secs=...\)`: expected a positive number, got 0\."),
        ({"batch_fn": "x"}, ConfigTypeError, r"`ComgraCallback\(batch_fn=...\)`: expected a callable or None, got 'x'"),
        ({"grads": "yes"}, ConfigTypeError, r"`ComgraCallback\(grads=...\)`: expected True or False, got 'yes'"),
        ({"storage_options": ["k"]}, ConfigTypeError, r"`ComgraCallback\(storage_options=...\)`: expected a dict or None"),
        ({"max_neurons": 0}, ConfigError, r"`ComgraCallback\(max_neurons=...\)`: expected a positive int, got 0\."),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ComgraCallback(**kwargs)


def test_storage_options_with_a_local_root_are_rejected_at_setup(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), storage_options={"anon": True})
    with pytest.raises(ConfigError, match="`storage_options`: only used with a URL root"):
        quiet_trainer([cb], tmp_path, max_steps=1).fit(make_mlp_module(), classification_loader())


def test_record_is_a_no_op_outside_recorded_steps(tmp_path: Path) -> None:
    t = torch.ones(3, requires_grad=True)
    assert record("x", t) is t
    assert t._backward_hooks is None or len(t._backward_hooks) == 0


class GradProbe(pl.Callback):
    """Placed after ComgraCallback: the parameters' gradients before clipping, and after."""

    def __init__(self) -> None:
        self.before: dict[int, float] = {}
        self.after: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        self.before[trainer.global_step] = module.net[0].weight.grad.double().norm().item()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after[trainer.global_step - 1] = module.net[0].weight.grad.double().norm().item()


def test_gradients_are_recorded_before_clipping_on_every_step(tmp_path: Path) -> None:
    probe = GradProbe()
    cb = ComgraCallback(str(tmp_path), run_name="clip")
    quiet_trainer([cb, probe], tmp_path, max_steps=5, gradient_clip_val=1e-4).fit(make_mlp_module(), classification_loader())
    grads = open_run(tmp_path / "clip").stats("net.0.weight", view="grad")
    for step in range(5):
        assert probe.after[step] < 1e-4 < probe.before[step]  # clipping happened, in place
        assert grads.loc[step, "l2"] == pytest.approx(probe.before[step], rel=1e-4)


def test_outputs_changed_in_place_later_keep_their_value_on_every_step(tmp_path: Path) -> None:
    class InPlace(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
            self.seen: dict[int, torch.Tensor] = {}
            self.net[0].register_forward_hook(lambda m, a, out: self.seen.__setitem__(self.global_step, out.detach().clone()))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = InPlace()
    cb = ComgraCallback(str(tmp_path), run_name="inplace")
    quiet_trainer([cb], tmp_path, max_steps=4).fit(module, classification_loader())
    run = open_run(tmp_path / "inplace")
    for step in range(4):
        before_relu = module.seen[step]
        assert (before_relu < 0).any()  # the ReLU really changed it afterwards
        assert run.stats("net.0").loc[step, "min"] == pytest.approx(before_relu.min().item(), rel=1e-5)
        assert run.stats("net.1").loc[step, "min"] == 0.0
    assert cb.recorder is None


def test_a_stable_node_is_kept_by_reference_after_the_first_step(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="stable")
    trainer = quiet_trainer([cb], tmp_path, max_steps=3)
    seen: list[bool] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            recorder = cb.recorder
            seen.append(bool(recorder and recorder._stable.get("net.0")))

    trainer.callbacks.append(Spy())
    trainer.fit(make_mlp_module(), classification_loader())
    assert seen == [True, True, True]  # learned after the first step; the values stay right (oracle tests)


class Recording(pl.LightningModule):
    """Calls record() with whatever ``what`` makes of the hidden activation."""

    def __init__(self, what: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.what = what

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.net[:2](x)
        record("extra", self.what(h))
        return nn.functional.cross_entropy(self.net[2](h), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_record_of_a_non_tensor_fails_on_a_step_that_is_not_recorded(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="bad", every_n_steps=100)
    trainer = quiet_trainer([cb], tmp_path, max_steps=3)
    step = {"n": 0}

    def what(h: torch.Tensor) -> Any:
        step["n"] += 1
        return h if step["n"] == 1 else h.tolist()  # step 0 is recorded; step 1 is not

    with pytest.raises(ConfigTypeError, match=r"`record\('extra', tensor=...\)`: expected a torch.Tensor, got list"):
        trainer.fit(Recording(what), classification_loader())
    assert step["n"] == 2


def test_a_nested_tensor_is_skipped_with_a_warning(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="nested")
    with pytest.warns(RuntimeWarning, match=r"node 'extra' is a sparse, nested, complex or meta tensor; it is not recorded"):
        quiet_trainer([cb], tmp_path, max_steps=2).fit(Recording(lambda h: torch.nested.nested_tensor([h[0].detach(), h[1, :3].detach()])), classification_loader())
    run = open_run(tmp_path / "nested")
    assert run.status == "finished" and "extra" not in run.nodes and run.steps["step"].tolist() == [0, 1]
