"""Graph layout on real models: labels that stay apart, and layers in dependency order even with cycles."""

from __future__ import annotations

from comgra_callbacks.dashboard import layout as lay


def test_long_hf_names_get_distinct_short_labels() -> None:
    names = [f"model.{part}.layers.{i}.self_attn.{proj}" for part in ("encoder", "decoder") for i in range(12) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"model.{part}.layers.{i}.self_attn" for part in ("encoder", "decoder") for i in range(12)] + ["loss", "batch.input_ids"]
    labels = lay.distinct_labels(names)
    assert len(set(labels.values())) == len(names)  # no two boxes read the same
    assert all(len(label) <= 22 for label in labels.values())
    assert labels["loss"] == "loss" and "11" in labels["model.decoder.layers.11.self_attn.v_proj"]


def test_a_recorded_node_is_drawn_right_of_its_input_even_in_a_cyclic_graph() -> None:
    # an RNN cell feeding itself (a cycle), and a record() node listed before its input
    kinds = {"probe": "intermediate", "input": "input", "cell": "intermediate", "h": "intermediate", "loss": "loss"}
    edges = [("input", "cell"), ("cell", "h"), ("h", "cell"), ("h", "probe"), ("probe", "loss"), ("h", "loss")]
    layout = lay.layered_layout(kinds, edges)
    layer = {n: b.layer for n, b in layout.boxes.items()}
    assert layer["input"] < layer["cell"] < layer["probe"] and layer["h"] < layer["probe"]
