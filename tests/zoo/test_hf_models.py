"""HuggingFace GPT-2, Llama and BERT built from configs (no download), trained by ``transformers.Trainer``
under ``ComgraTrainerCallback``, compared with an oracle ``TrainerCallback`` that uses plain hooks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from comgra_callbacks import ComgraTrainerCallback, open_run  # noqa: E402
from tests.integrations.tiny_hf import MaskedTokens, tiny_bert, training_args  # noqa: E402

from ._oracle import ModuleOracle, assert_full, assert_nodes, assert_path, kinds, step_of  # noqa: E402

pytestmark = pytest.mark.slow
STEPS, VOCAB, SEQ = 3, 64, 10


@dataclass(frozen=True)
class Family:
    embedding: str
    attention: str  # the attention module of the first layer
    block: str  # the first layer
    logits: tuple[str, ...]  # the logits' module, then containers that return the very same tensor
    leaves: tuple[str, ...]  # leaf modules whose values and gradients are compared
    params: tuple[str, ...]


FAMILIES = {
    "gpt2": Family("transformer.wte", "transformer.h.0.attn", "transformer.h.0", ("lm_head",),
                   ("transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "transformer.ln_f", "lm_head"),
                   ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias")),
    "llama": Family("model.embed_tokens", "model.layers.0.self_attn", "model.layers.0", ("lm_head",),
                    ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.norm", "lm_head"),
                    ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight")),
    "bert": Family("bert.embeddings.word_embeddings", "bert.encoder.layer.0.attention.self", "bert.encoder.layer.0",
                   ("cls.predictions.decoder", "cls.predictions", "cls"),
                   ("bert.embeddings.word_embeddings", "bert.encoder.layer.0.attention.self.query",
                    "bert.encoder.layer.1.output.dense", "cls.predictions.decoder"),
                   ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.intermediate.dense.weight")),
}


def build(family: str) -> Any:
    torch.manual_seed(0)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return tiny_bert()


class CausalTokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()}


class HFOracle(TrainerCallback):
    """Per optimizer step: every module's outputs and their gradients, the model's inputs and loss, the
    parameters before the step, their gradients at ``on_pre_optimizer_step`` and the updates."""

    def __init__(self) -> None:
        self.modules = ModuleOracle()
        self.input_ids: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.before: list[dict[str, torch.Tensor]] = []
        self.param_grads: list[dict[str, torch.Tensor]] = []
        self.updates: list[dict[str, torch.Tensor]] = []
        self._handles: list[Any] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.modules.attach(model)
        self.before.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def before_forward(module: Any, a: Any, kwargs: Any) -> None:
            self.input_ids.append(kwargs["input_ids"].clone())

        def after_forward(module: Any, a: Any, out: Any) -> None:
            self.losses.append(float(out.loss.detach()))

        self._handles = [model.register_forward_pre_hook(before_forward, with_kwargs=True), model.register_forward_hook(after_forward)]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.param_grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.updates.append({n: p.detach() - self.before[-1][n] for n, p in model.named_parameters()})
        self.modules.detach()
        for handle in self._handles:
            handle.remove()


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, HFOracle]:
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    model = build(family)
    cb = ComgraTrainerCallback(str(tmp / "runs"), run_name=family, flush_secs=0.1, detail={"*": "full"})
    oracle = HFOracle()
    data = MaskedTokens() if family == "bert" else CausalTokens()
    Trainer(model=model, args=training_args(str(tmp / "out"), max_steps=STEPS), train_dataset=data, callbacks=[cb, oracle]).train()
    return family, open_run(tmp / "runs" / family), oracle


def test_inputs_logits_loss_and_graph(hf_run: tuple[str, Any, HFOracle]) -> None:
    family, run, oracle = hf_run
    spec = FAMILIES[family]
    assert run.status == "finished" and run.steps["step"].tolist() == list(range(STEPS))
    assert_nodes(run, {"batch.input_ids": "input", "batch.attention_mask": "input", "batch.labels": "target",
                       spec.embedding: None, "loss": "loss"})
    assert_path(run, "batch.labels", "loss")
    assert_path(run, spec.embedding, "loss")
    # the logits are the model's output. For BERT the head modules return the decoder's tensor: a wrapper
    # (one child ran) adds nothing, a module that ran several children is a node of its own, joined to the
    # decoder by a "same" edge (one tensor, several names): all of them are the output
    outputs = [n for n, k in kinds(run).items() if k == "output"]
    assert outputs and set(outputs) <= set(spec.logits), f"{family}: output nodes {outputs}, expected among {spec.logits}"
    for a, b in zip(outputs, outputs[1:]):
        assert run.graph.edges[a, b]["source"] == "same", f"{family}: outputs {a!r} and {b!r} are not one tensor"
    for step in range(STEPS):
        at = step_of(run, step)
        assert_full(run, "batch.input_ids", at, oracle.input_ids[step])
        assert run.stats("loss")["mean"][at] == pytest.approx(oracle.losses[step], rel=1e-5)
        assert_full(run, outputs[0], at, oracle.modules.value(step, spec.logits[0]))


def test_integer_ids_connect_to_the_embedding(hf_run: tuple[str, Any, HFOracle]) -> None:
    family, run, _ = hf_run
    embedding = FAMILIES[family].embedding
    assert ("batch.input_ids", embedding) in run.graph.edges, f"{family}: no edge batch.input_ids -> {embedding}"  # GPT-2: through a view
    assert_path(run, "batch.input_ids", "loss")


def test_attention_and_block_are_nodes(hf_run: tuple[str, Any, HFOracle]) -> None:
    family, run, _ = hf_run
    spec = FAMILIES[family]
    assert_nodes(run, {spec.attention: None, spec.block: None})
    assert_path(run, spec.embedding, spec.attention)
    assert_path(run, spec.attention, spec.block)
    assert_path(run, spec.block, "loss")


def test_leaf_values_and_gradients_match(hf_run: tuple[str, Any, HFOracle]) -> None:
    family, run, oracle = hf_run
    for node in FAMILIES[family].leaves:
        for step in range(STEPS):
            at = step_of(run, step)
            assert_full(run, node, at, oracle.modules.value(step, node))
            assert_full(run, node, at, oracle.modules.grad(step, node), view="grad", rtol=1e-4, atol=1e-7)


def test_attention_and_block_values_and_gradients_match(hf_run: tuple[str, Any, HFOracle]) -> None:
    family, run, oracle = hf_run
    spec = FAMILIES[family]
    for node in (spec.attention, spec.block):
        for step in range(STEPS):
            at = step_of(run, step)
            assert_full(run, node, at, oracle.modules.value(step, node))  # (attn_output, None): no suffix
            assert_full(run, node, at, oracle.modules.grad(step, node), view="grad", rtol=1e-4, atol=1e-7)


def test_parameters_gradients_and_updates_match(hf_run: tuple[str, Any, HFOracle]) -> None:
    family, run, oracle = hf_run
    for name in FAMILIES[family].params:
        for step in range(STEPS):
            at = step_of(run, step)
            assert_full(run, name, at, oracle.before[step][name])
            assert_full(run, name, at, oracle.param_grads[step][name], view="grad", rtol=1e-4, atol=1e-7)
            assert_full(run, name, at, oracle.updates[step][name], view="update", rtol=1e-4, atol=1e-7)


def test_no_hooks_left(tmp_path: Path) -> None:
    model = build("gpt2")
    cb = ComgraTrainerCallback(str(tmp_path / "runs"), run_name="hooks", flush_secs=0.1)
    Trainer(model=model, args=training_args(str(tmp_path / "out"), max_steps=1), train_dataset=CausalTokens(), callbacks=[cb]).train()
    assert [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks] == []
    assert open_run(tmp_path / "runs" / "hooks").status == "finished"
