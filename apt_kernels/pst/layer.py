"""PSTLinear: a drop-in ``nn.Linear`` whose frozen weight is pruned by PST's trainable importance scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from .. import bits
from . import REGISTRY, _check_nm, _run
from .reference import n_pruned

FACTOR_NAMES = ("pst_u", "pst_v", "pst_a", "pst_b", "pst_r", "pst_c")


def popcount(words: torch.Tensor) -> int:
    """Number of set bits in packed int32 words (SWAR on int64: no sign trouble, no dense bool tensor)."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = ((x * 0x01010101) & 0xFFFFFFFF) >> 24
    return int(x.sum())


class PSTLinear(nn.Module):
    """``y = x @ W'^T + bias`` with ``W' = M * (W0 + beta U V)``: PST on a frozen weight W0.

    ``weight`` is W0, frozen (``requires_grad=False``); the trainable parameters are the low-rank
    update ``pst_u`` (out, rank_w), ``pst_v`` (rank_w, in) and the score factors ``pst_a``
    (out, rank_s), ``pst_b`` (rank_s, in), ``pst_r`` (out,), ``pst_c`` (in,). The mask M prunes
    exactly ``floor(out * in * sparsity)`` weights with the smallest importance scores
    ``|W| + alpha1 A B + alpha2 (R + C)`` (or, with ``nm=(N, M)``, keeps N of every M consecutive
    weights of a row), recomputed at every forward; the backward is straight-through (docs/math.md,
    section 3). The bias is kept as in ``nn.Linear``.

    Initialisation (as the paper's code): U, A ~ N(0, init_std^2); V, B, R, C = 0, so at step 0
    W = W0 and the mask is magnitude pruning. The factors are float32 (float64 for a float64 weight)
    unless ``factor_dtype`` says otherwise, so a bf16/fp16 model trains them in full precision.

    ``sparsity`` is the sparsity of the next forward; :class:`SparsityScheduler` moves it from
    ``initial_sparsity`` to ``final_sparsity`` (the constructor's ``sparsity``). ``realised_sparsity``
    reads the mask of the last forward.

    Example:
        >>> import torch, apt_kernels
        >>> layer = apt_kernels.PSTLinear.from_linear(torch.nn.Linear(64, 32), sparsity=0.75)
        >>> y = layer(torch.randn(4, 64)); y.sum().backward()
        >>> layer.realised_sparsity
        0.75
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float = 0.9,
                 rank_w: int = 8, rank_s: int = 8, beta: float = 1.0, alpha1: float = 1.0, alpha2: float = 1.0,
                 nm: tuple[int, int] | None = None, backend: str = "auto", init_std: float = 0.02,
                 factor_dtype: torch.dtype | None = None, device=None, dtype=None):
        super().__init__()
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's initialisation
        b = None
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        self._setup(weight, b, sparsity=sparsity, rank_w=rank_w, rank_s=rank_s, beta=beta, alpha1=alpha1,
                    alpha2=alpha2, nm=nm, backend=backend, init_std=init_std, factor_dtype=factor_dtype)

    # -- construction ---------------------------------------------------------------------------------

    def _setup(self, weight, bias, *, sparsity, rank_w, rank_s, beta, alpha1, alpha2, nm, backend, init_std,
               factor_dtype):
        V.tensor("weight", weight, ndim=2)
        out_features, in_features = weight.shape
        for name, x in (("rank_w", rank_w), ("rank_s", rank_s)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"{name} must be an int >= 0, got {x!r}")
        # every option is checked before the weight is touched (from_linear freezes the caller's Parameter)
        beta, alpha1, alpha2 = V.number("beta", beta), V.number("alpha1", alpha1), V.number("alpha2", alpha2)
        nm = None if nm is None else _check_nm(nm, in_features)
        final = (V.number("sparsity", sparsity, lo=0.0, hi=1.0, hi_open=True) if nm is None
                 else 1.0 - nm[0] / nm[1])
        REGISTRY.check_backend(backend)
        if factor_dtype is not None and not (isinstance(factor_dtype, torch.dtype) and factor_dtype.is_floating_point):
            raise TypeError(f"factor_dtype must be a floating torch.dtype or None, got {factor_dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        if isinstance(weight, nn.Parameter):  # the same Parameter object (ties and identity survive), frozen
            self.weight = weight.requires_grad_(False)
        else:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if isinstance(bias, nn.Parameter) or bias is None:
            self.bias = bias
        else:
            self.bias = nn.Parameter(bias.detach())
        self.beta, self.alpha1, self.alpha2 = beta, alpha1, alpha2
        self.nm = nm
        self.final_sparsity = final
        self._count = torch.zeros((), dtype=torch.int64, device="cpu")  # kept by the sparsity setter
        self.sparsity = self.final_sparsity
        self.backend = backend
        self.last_backend: str | None = None
        self._words: torch.Tensor | None = None
        dev = weight.device
        fd = factor_dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)
        n, k = out_features, in_features
        self.pst_u = nn.Parameter(torch.randn(n, rank_w, device=dev, dtype=fd) * init_std)
        self.pst_v = nn.Parameter(torch.zeros(rank_w, k, device=dev, dtype=fd))
        self.pst_a = nn.Parameter(torch.randn(n, rank_s, device=dev, dtype=fd) * init_std)
        self.pst_b = nn.Parameter(torch.zeros(rank_s, k, device=dev, dtype=fd))
        self.pst_r = nn.Parameter(torch.zeros(n, device=dev, dtype=fd))
        self.pst_c = nn.Parameter(torch.zeros(k, device=dev, dtype=fd))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "PSTLinear":
        """Wrap ``linear``: its weight Parameter becomes the frozen W0 (the same object, not a copy; its
        ``requires_grad`` is set to False), its bias Parameter is kept as is."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, **_defaults(kwargs))
        return layer

    @classmethod
    def from_conv1d(cls, conv, **kwargs) -> "PSTLinear":
        """Wrap a transformers ``Conv1D`` (GPT-2 style, weight (in, out)); W0 is its weight transposed."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(conv.weight.detach().t().contiguous(), conv.bias, **_defaults(kwargs))
        layer.conv1d_type = type(conv)  # export_pst gives a Conv1D back (checkpoints keep their layout)
        return layer

    # -- forward --------------------------------------------------------------------------------------

    def factors(self):
        return tuple(getattr(self, name) for name in FACTOR_NAMES)

    @property
    def sparsity(self) -> float:
        """The fraction of weights the next forward prunes (set by :class:`SparsityScheduler`)."""
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        if self.nm is not None:
            if value != self.final_sparsity:
                raise ValueError(f"an N:M layer's sparsity is fixed at 1 - N/M = {self.final_sparsity:g}")
            self._sparsity = self.final_sparsity
            return
        self._sparsity = V.number("sparsity", value, lo=0.0, hi=1.0, hi_open=True)
        # The pruned count as a 0-dim CPU tensor, updated in place: under torch.compile the forward reads
        # this (a graph input) and not the float (which the graph would hold as a constant, recompiling at
        # every scheduler step).
        self._count.fill_(n_pruned(self.weight.numel(), self._sparsity))

    def _masked(self, backend=None):
        if self.nm is None and torch.compiler.is_compiling():
            sparsity, count = None, self._count
        else:
            sparsity, count = None if self.nm else self._sparsity, None
        w, words, name = _run(self.weight, *self.factors(), sparsity, self.beta, self.alpha1, self.alpha2,
                              backend or self.backend, self.nm, count=count)
        self._words = words.detach()
        self.last_backend = name
        return w

    def masked_weight(self) -> torch.Tensor:
        """W' = M * W in the weight's dtype, differentiable with respect to the PST factors."""
        return self._masked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._masked(), self.bias)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The bool keep-mask (out, in) at the current sparsity (True = kept)."""
        self._masked()
        return bits.unpack_bits(self._words, self.weight.shape)

    @property
    def n_pruned(self) -> int:
        """The number of weights the current target prunes."""
        if self.nm is not None:
            return self.weight.numel() // self.nm[1] * (self.nm[1] - self.nm[0])
        return n_pruned(self.weight.numel(), self.sparsity)

    @property
    def realised_sparsity(self) -> float:
        """Fraction of weights masked in the last forward (a fresh mask if there was none yet)."""
        if self._words is None:
            with torch.no_grad():
                self._masked()
        numel = self.weight.numel()
        return (numel - popcount(self._words)) / numel if numel else 0.0

    @torch.no_grad()
    def to_linear(self, semi_structured: bool = False) -> nn.Linear:
        """A plain ``nn.Linear`` with W' baked in (pruned entries are exact +0.0), bias shared.

        ``semi_structured=True`` (N:M = 2:4 on CUDA) stores the weight as
        ``torch.sparse.to_sparse_semi_structured(W')`` for sparse inference.
        """
        w = self._masked() + 0.0  # -0.0 (a pruned negative weight) -> +0.0
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        if semi_structured:
            if self.nm != (2, 4):
                raise ValueError(f"semi-structured sparse weights need nm=(2, 4), this layer has nm={self.nm}")
            if w.device.type != "cuda":
                raise ValueError("torch's semi-structured sparse tensors need CUDA weights")
            try:
                from torch.sparse import to_sparse_semi_structured

                lin.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            except Exception as e:  # noqa: BLE001 - shape/dtype/device limits of the sparse kernels
                raise ValueError(f"to_sparse_semi_structured failed for a {tuple(w.shape)} {w.dtype} weight: "
                                 f"{type(e).__name__}: {e}") from e
        else:
            lin.weight = nn.Parameter(w, requires_grad=False)  # W' is derived: frozen like W0
        lin.bias = self.bias
        return lin

    @torch.no_grad()
    def to_dense(self, semi_structured: bool = False) -> nn.Module:
        """What :func:`apt_kernels.hf.export_pst` puts back: :meth:`to_linear`'s ``nn.Linear``, or, for a
        layer made from a transformers ``Conv1D`` (GPT-2), a ``Conv1D`` of the same type holding W'
        transposed, so that the exported model saves and loads as the original architecture
        (``semi_structured=True`` gives the ``nn.Linear``: torch's sparse kernels take that layout)."""
        conv_type = getattr(self, "conv1d_type", None)
        if conv_type is None or semi_structured:
            return self.to_linear(semi_structured=semi_structured)
        w = self._masked() + 0.0
        conv = conv_type(self.out_features, self.in_features)
        conv.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        conv.bias = self.bias
        return conv

    # -- checkpoints --------------------------------------------------------------------------------------

    def get_extra_state(self) -> torch.Tensor:
        """The sparsity of the next forward (a schedule's position): in ``state_dict()``, so a checkpoint
        reloads at the sparsity it was saved at (float64, not a buffer: ``.to(dtype)`` leaves it alone)."""
        return torch.tensor(self._sparsity, dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        self.sparsity = float(state)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A layer made from a Conv1D (GPT-2) saves W0 in Conv1D's (in, out) layout, under Conv1D's key: its
        # checkpoints keep the original architecture's layout (a square weight loaded silently transposed)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if getattr(self, "conv1d_type", None) is not None and prefix + "weight" in destination:
            destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, extra = prefix + "weight", prefix + "_extra_state"
        # (out, in) for this call only (the caller's dict is restored); a checkpoint without _extra_state predates
        # the Conv1D layout and the saved sparsity: its W0 is already (out, in), its layers keep their sparsity
        saved = state_dict.get(key) if getattr(self, "conv1d_type", None) is not None and extra in state_dict else None
        if saved is not None:
            state_dict[key] = saved.t().contiguous()  # contiguous: load_state_dict(assign=True) keeps it as W0
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            if saved is not None:
                state_dict[key] = saved
        if extra not in state_dict and extra in missing_keys:
            missing_keys.remove(extra)

    def extra_repr(self) -> str:
        sp = f"nm={self.nm}" if self.nm else f"sparsity={self.sparsity:g} (final {self.final_sparsity:g})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{sp}, rank_w={self.pst_u.shape[1]}, rank_s={self.pst_a.shape[1]}, backend={self.backend!r}")


def _defaults(kwargs: dict) -> dict:
    allowed = dict(sparsity=0.9, rank_w=8, rank_s=8, beta=1.0, alpha1=1.0, alpha2=1.0, nm=None, backend="auto",
                   init_std=0.02, factor_dtype=None)
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unexpected PSTLinear options {sorted(unknown)}; options are {sorted(allowed)}")
    allowed.update(kwargs)
    return allowed
