"""SparsityScheduler: PST's cubic sparsity schedule, for a plain training loop or a transformers Trainer."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .. import _validate as V


def cubic_sparsity(step: int, total_steps: int | None, initial: float, final: float,
                   initial_fraction: float = 0.1, final_fraction: float = 0.3) -> float:
    """s(t): ``initial`` for t < f_i T, ``final`` for t >= (1 - f_f) T, a cubic ramp in between.

        s(t) = final + (initial - final) * (1 - (t - f_i T) / ((1 - f_i - f_f) T))^3

    With ``total_steps`` unknown (None) the schedule has not started: ``initial``.
    """
    if total_steps is None:
        return initial
    t, total = float(step), float(total_steps)
    start = initial_fraction * total
    end = (1.0 - final_fraction) * total
    if t < start:
        return initial
    if t >= end or end <= start:
        return final
    progress = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


class SparsityScheduler:
    """Sets the ``sparsity`` of every :class:`~apt_kernels.PSTLinear` of a model along the cubic schedule.

    Plain loop::

        sched = SparsityScheduler(model, total_steps=1000)   # applies s(0) now
        for batch in loader:
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
            sched.step()                                      # applies s(t) for the next step

    transformers ``Trainer``: ``trainer.add_callback(SparsityScheduler(model))``; it reads
    ``state.max_steps`` at ``on_train_begin`` (when ``total_steps`` is None) and sets s(global_step)
    before every step; ``on_log`` adds ``pst_sparsity`` and ``pst_realised_sparsity`` to the logs and to
    ``state.log_history`` (``trainer_state.json``). Passed as ``Trainer(callbacks=[sched])`` it runs before
    the progress printer, so the printed logs show them too (``add_callback`` puts it after the printer;
    reporting integrations such as TensorBoard run before any user callback either way).

    Args:
        model: a module containing PSTLinear layers, or an iterable of them.
        total_steps: T, the number of optimizer steps (None: taken from the Trainer).
        final_sparsity: s_final for every layer; None: each layer's own ``final_sparsity`` (the
            ``sparsity`` it was built with).
        initial_sparsity: s_initial (default 0: training starts dense).
        initial_fraction, final_fraction: the hold fractions f_i (default 0.1) and f_f (default 0.3).

    Layers in N:M mode keep their fixed pattern and are not scheduled. ``current_sparsity`` and
    ``realised_sparsity()`` are readable at any time.
    """

    def __init__(self, model: nn.Module | Iterable[nn.Module], total_steps: int | None = None, *,
                 final_sparsity: float | None = None, initial_sparsity: float = 0.0,
                 initial_fraction: float = 0.1, final_fraction: float = 0.3):
        from .layer import PSTLinear

        mods = model.modules() if isinstance(model, nn.Module) else model
        self.layers = [m for m in mods if isinstance(m, PSTLinear)]
        if not self.layers:
            raise ValueError("SparsityScheduler found no PSTLinear layers (apply apt_kernels.hf.apply_pst first)")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        self.total_steps = total_steps
        self.final_sparsity = (None if final_sparsity is None else
                               V.number("final_sparsity", final_sparsity, lo=0.0, hi=1.0, hi_open=True))
        self.initial_sparsity = V.number("initial_sparsity", initial_sparsity, lo=0.0, hi=1.0, hi_open=True)
        self.initial_fraction = V.number("initial_fraction", initial_fraction, lo=0.0, hi=1.0)
        self.final_fraction = V.number("final_fraction", final_fraction, lo=0.0, hi=1.0)
        if self.initial_fraction + self.final_fraction > 1.0:
            raise ValueError(f"initial_fraction + final_fraction must be at most 1, got "
                             f"{self.initial_fraction} + {self.final_fraction}")
        self.step_count = 0
        self.apply()

    # -- the schedule ---------------------------------------------------------------------------------

    def _final(self, layer) -> float:
        return layer.final_sparsity if self.final_sparsity is None else self.final_sparsity

    def sparsity_at(self, step: int, final: float | None = None) -> float:
        """The target sparsity at ``step`` (for ``final``, default: the scheduler's or the first layer's)."""
        if final is None:
            final = self.final_sparsity if self.final_sparsity is not None else self._scheduled()[0].final_sparsity
        return cubic_sparsity(step, self.total_steps, self.initial_sparsity, final,
                              self.initial_fraction, self.final_fraction)

    def _scheduled(self):
        return [layer for layer in self.layers if layer.nm is None] or self.layers

    def apply(self) -> None:
        """Set every layer's sparsity for the current step."""
        for layer in self.layers:
            if layer.nm is None:
                layer.sparsity = self.sparsity_at(self.step_count, self._final(layer))

    def step(self) -> None:
        """Advance one optimizer step and apply the new target."""
        if self.total_steps is None:  # a plain loop that forgot it would stay at the initial sparsity for ever
            raise ValueError("SparsityScheduler.step() needs total_steps: pass SparsityScheduler(model, "
                             "total_steps=...) in a plain loop (as a Trainer callback it is set at train begin)")
        self.step_count += 1
        self.apply()

    @property
    def current_sparsity(self) -> float:
        """The current target: the fraction of all PST weights the next forward prunes."""
        total = sum(layer.weight.numel() for layer in self.layers)
        return sum(layer.n_pruned for layer in self.layers) / total if total else 0.0

    def realised_sparsity(self) -> float:
        """The fraction of all PST weights masked in each layer's last forward."""
        total = sum(layer.weight.numel() for layer in self.layers)
        return sum(layer.realised_sparsity * layer.weight.numel() for layer in self.layers) / total if total else 0.0

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = state["total_steps"]
        self.apply()

    # -- transformers TrainerCallback protocol (duck-typed: no import of transformers) -----------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.total_steps is None:
            self.total_steps = int(state.max_steps)
        self.step_count = int(state.global_step)
        self.apply()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_count = int(state.global_step)
        self.apply()

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {"pst_sparsity": round(self.current_sparsity, 6),
                  "pst_realised_sparsity": round(self.realised_sparsity(), 6)}
        if logs is not None:
            logs.update(values)
        # Trainer has already copied these logs into state.log_history (trainer_state.json): add them there
        history = getattr(state, "log_history", None)
        if history and isinstance(history[-1], dict) and history[-1].get("step") == getattr(state, "global_step", None):
            history[-1].update(values)

    def __getattr__(self, name):
        # Every other Trainer event (on_epoch_begin, on_save, ... and future ones) is a no-op.
        if name.startswith("on_"):
            return _noop
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __repr__(self) -> str:
        return (f"SparsityScheduler(step {self.step_count}/{self.total_steps}, {len(self.layers)} layers, "
                f"target {self.current_sparsity:.4f}, initial {self.initial_sparsity}, "
                f"holds {self.initial_fraction}/{self.final_fraction})")


def _noop(*args, **kwargs):
    return None
