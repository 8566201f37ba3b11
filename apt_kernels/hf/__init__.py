"""Model-level helpers for Hugging Face transformers models (any ``nn.Module`` works)."""

from .apt import (apply_apt, apply_prefix_tuning, apply_prompt_tuning, gate_report, load_apt, remove_apt,
                  save_apt)
from .pst import apply_pst, export_pst, pst_layers, trainable_parameters

__all__ = ["apply_apt", "apply_prefix_tuning", "apply_prompt_tuning", "gate_report", "load_apt", "remove_apt",
           "save_apt", "apply_pst", "export_pst", "pst_layers", "trainable_parameters"]
