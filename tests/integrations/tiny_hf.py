"""A tiny BERT built from a config (no download), a seeded masked-token dataset, and quiet TrainingArguments.

Imported by the tests and by the scripts they run in subprocesses (torchrun), so it imports only transformers
and torch.
"""

from __future__ import annotations

from typing import Any

import torch

SEQ = 12
VOCAB = 100


def tiny_bert(seed: int = 0) -> Any:
    """``BertForMaskedLM`` with 2 layers of width 32: ``input_ids (B, SEQ) -> logits (B, SEQ, VOCAB)``."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertForMaskedLM(config)


class MaskedTokens(torch.utils.data.Dataset):
    """``n`` seeded sequences; every third token is a prediction target (``labels`` is -100 elsewhere)."""

    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(5, VOCAB, (SEQ,), generator=g)
        labels = torch.full((SEQ,), -100)
        labels[::3] = ids[::3]
        masked = ids.clone()
        masked[::3] = 4  # the "[MASK]" id of this toy vocabulary
        return {"input_ids": masked, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels}


def training_args(output_dir: str, **overrides: Any) -> Any:
    """CPU ``TrainingArguments`` that save nothing, report nothing and print little."""
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(
        output_dir=output_dir,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        per_device_train_batch_size=4,
        max_steps=6,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)
