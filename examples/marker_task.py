"""The small task two examples share (quickstart.py, train_child_tuning.py): label 1 iff a marker token
appears somewhere in a padded random sequence, on a tiny BERT classifier built from a config (no
downloads). Imported by the scripts as a sibling module (Python puts a script's folder on sys.path)."""

from __future__ import annotations

import torch

VOCAB, SEQ, MARKER, PAD = 100, 16, 7, 0


def make_dataset(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n padded sequences of 8..16 random tokens; about half contain the marker token somewhere."""
    ids = torch.randint(1, VOCAB - 1, (n, SEQ), generator=generator)
    ids = ids + (ids >= MARKER).long()  # tokens in 1..99 except the marker
    lengths = torch.randint(8, SEQ + 1, (n,), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    where = (torch.rand(n, generator=generator) * lengths).long()
    rows = labels.nonzero().squeeze(1)
    ids[rows, where[rows]] = MARKER
    keep = torch.arange(SEQ)[None, :] < lengths[:, None]
    return {"input_ids": ids.masked_fill(~keep, PAD), "attention_mask": keep.long(), "labels": labels}


def batches(data: dict[str, torch.Tensor], batch_size: int, device, generator=None) -> list[dict]:
    n = data["labels"].numel()
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [{k: t[order[i:i + batch_size]].to(device) for k, t in data.items()} for i in range(0, n, batch_size)]


def tiny_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=VOCAB, num_labels=2, max_position_embeddings=64)
    return BertForSequenceClassification(config)


@torch.no_grad()
def evaluate(model, data_batches) -> tuple[float, float]:
    """(mean loss, accuracy) over the batches, in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for b in data_batches:
        out = model(**b)
        loss += float(out.loss) * b["labels"].numel()
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
        n += b["labels"].numel()
    model.train(was)
    return loss / n, correct / n
