"""Child-Tuning: masked-gradient AdamW and Fisher masks. Math: docs/math.md, section 4."""

from .fisher import fisher_mask
from .optimizer import ChildTuningAdamW
from .rng import keep_mask

__all__ = ["ChildTuningAdamW", "fisher_mask", "keep_mask"]
