"""The task head of a Hugging Face model: what ``train_head`` leaves trainable (APT and PST alike)."""

from __future__ import annotations

from torch import nn


def task_head(model: nn.Module) -> list[nn.Parameter] | None:
    """Parameters outside ``model.base_model`` (a classifier, a QA or token-classification head), minus weights
    tied to the base model and minus a language model's output embeddings (its vocabulary projection: an untied
    ``lm_head`` is 131 M parameters in Llama-2-7B, not a task head). None for a model without ``base_model``."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return None
    frozen = {id(p) for p in base.parameters()}
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(lm_head, nn.Module):
        frozen |= {id(p) for p in lm_head.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]
