"""Model-level helpers for Hugging Face transformers models (any ``nn.Module`` works)."""

from .pst import apply_pst, export_pst, pst_layers, trainable_parameters

__all__ = ["apply_pst", "export_pst", "pst_layers", "trainable_parameters"]
