"""Child-Tuning: masked-gradient AdamW and Fisher masks. Math: docs/math.md, section 4; design:
docs/child_tuning.md."""

from .fisher import fisher_mask, load_masks, save_masks
from .optimizer import ChildTuningAdamW
from .rng import keep_mask

__all__ = ["ChildTuningAdamW", "fisher_mask", "keep_mask", "load_masks", "save_masks"]
