"""The three ``sparse_matrix`` layers: the sampled sparse layer, REINFORCE, and a dense baseline.

Each answers a ``SparseMatrixSpec``: ``forward(x: (b, *in_shape)) -> (b, *out_shape)`` computes
``y = W x`` with ``W`` of shape ``out_shape + in_shape``, and ``eval()`` makes ``W`` deterministic.
The sparse and REINFORCE layers share the paper's parametrisation (``k`` continuous index tuples
with means, variances and values, §3.1), so they differ only in how a gradient reaches the means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.special import log_ndtr

from estimators.base import SparseMatrixSpec, StructureLayer
from estimators.sparse import (
    SparseLayer,
    SparseLayerError,
    rounded_product,
    sparse_mv,
    weight_shape,
)
from estimators.sparse.functional import (
    DEFAULT_TAIL,
    Normalise,
    PooledForm,
    transform_means,
    transform_sigmas,
)

__all__ = [
    "BASELINES",
    "LOG_PROBS",
    "SIGMA_FORMS",
    "DenseMatrixLayer",
    "ReinforceMatrixLayer",
    "SparseMatrixLayer",
    "discretised_log_prob",
]

Baseline = Literal["moving_average", "leave_one_out", "none"]
LogProb = Literal["discretised", "continuous"]
BASELINES: tuple[Baseline, ...] = ("moving_average", "leave_one_out", "none")
LOG_PROBS: tuple[LogProb, ...] = ("discretised", "continuous")
SigmaForm = Literal["variance", "std"]
SIGMA_FORMS: tuple[SigmaForm, ...] = ("variance", "std")


class SparseMatrixLayer(StructureLayer):
    """The paper's sampled sparse layer (Algorithm 1) with ``spec.k`` free continuous tuples.

    Hyperparameters: ``a_l`` local and ``a_g`` global samples per tuple, the local ``region``
    (default ``ceil(log2 h)`` per dimension, as in the paper's identity experiments), ``tau`` (the
    variance floor), ``normalise``, ``fix_values`` and ``chunk`` (tuples per gradient-accumulation
    pass).

    ``normalise`` defaults to ``"pooled"``, the literal Algorithm 1 and the reference code: every
    tuple's density is normalised over the integer tuples sampled for *all* ``k`` tuples, so a
    tuple feels the loss at entries that only other tuples sampled. With ``"tuple"`` (cheaper,
    linear in ``k``) a tuple sees only its own few samples, and two tuples stuck on one entry never
    find the empty one: on the identity (n = 8, 16) the rounded-means loss stalls at 0.25-0.5.
    ``pooled`` picks how pooled is computed: ``"truncated"`` (default) evaluates only the pairs
    within a cut-off, neglecting less than ``tail`` of each tuple's weight (cost linear in ``k``
    for fixed relative sigmas); ``"all_pairs"`` is the exact ``O(b k^2 s)`` reference.
    ``fix_values=True`` (default False; see ``SparseLayer``) fixes every value at 1, as the
    reference identity experiment's ``fix_values`` flag; with learned values the identity
    converges to overlapping tuples of opposite-sign values whose rounded structure is wrong.
    """

    def __init__(
        self,
        spec: SparseMatrixSpec,
        *,
        a_l: int = 2,
        a_g: int = 2,
        region: Sequence[int] | None = None,
        tau: float = 0.1,
        normalise: Normalise = "pooled",
        pooled: PooledForm = "truncated",
        tail: float = DEFAULT_TAIL,
        fix_values: bool = False,
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.sparse = SparseLayer(
            spec.in_shape, spec.out_shape, spec.k, a_l=a_l, a_g=a_g, region=region, tau=tau,
            normalise=normalise, pooled=pooled, tail=tail, chunk=chunk, fix_values=fix_values,
        )
        self._last_sample: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.sparse(x)
        indices = self.sparse.sample_batch(x.shape[0])  # (b, k, s, r), no gradient
        self._last_sample = indices[0].clone()  # (k, s, r): the first instance, for Fig. 3
        return self.sparse(x, indices=indices)

    def snapshot(self) -> dict[str, Tensor]:
        """Means and variances ``(k, r)`` in index space, values ``(k,)`` and, after a training
        forward, the integer tuples ``samples (k, s, r)`` of its first instance."""
        out = {
            "means": self.sparse.means().detach().cpu(),
            "sigmas": self.sparse.sigmas().detach().cpu(),
            "values": self.sparse.values.detach().cpu(),
        }
        if self._last_sample is not None:
            out["samples"] = self._last_sample.cpu()
        return out


def discretised_log_prob(
    indices: Tensor, means: Tensor, sigmas: Tensor, shape: Sequence[int]
) -> Tensor:
    """``log P(round(clamp(z)) = j)`` for ``z ~ N(mean, diag(sigma))``, summed over dimensions.

    indices ``(..., r)`` int, means and variances ``(..., r)`` -> ``(...)``. Each integer ``j``
    owns ``[j - 0.5, j + 0.5)``; the edge cells ``0`` and ``h - 1`` also own the tails beyond them,
    since samples are clamped into bounds. Differentiable in means and sigmas.
    """
    std = sigmas.sqrt()
    point = indices.to(means.dtype)
    lo = (point - 0.5 - means) / std  # (..., r), finite everywhere so where() has clean grads
    hi = (point + 0.5 - means) / std
    upper = means.new_tensor(shape) - 1
    first, last = point == 0, point == upper
    # log(Phi(hi) - Phi(lo)); reflect intervals right of zero into the left tail for accuracy
    flip = lo > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b, log_a = log_ndtr(b), log_ndtr(a)
    tiny = torch.finfo(means.dtype).tiny
    middle = log_b + torch.log(-torch.expm1((log_a - log_b).clamp(max=-tiny)))
    cell = torch.where(first, log_ndtr(hi), torch.where(last, log_ndtr(-lo), middle))
    cell = torch.where(first & last, torch.zeros_like(cell), cell)  # a dimension of size 1
    return cell.sum(-1)


class ReinforceMatrixLayer(StructureLayer):
    """REINFORCE baseline of §3.1: one integer tuple per continuous tuple, score-function gradient.

    A *structure* is one draw for all ``k`` continuous tuples: each draws ``z ~ N(mean,
    diag(sigma))`` (sigma a variance, as in the sparse layer), rounds and clamps it, and ``W``
    holds value ``nu`` there. ``samples=0`` (default) draws one structure per instance, as the
    authors' code does; ``samples=s`` draws ``s`` structures per step, shared round-robin by the
    batch (instance ``i`` uses draw ``i % s``). ``objective`` adds ``mean_u((L_u - b_u) *
    log p_u)`` over the draws ``u`` with ``L_u`` the mean loss of the instances that used draw
    ``u`` and the difference detached. The two variance-reduction choices:

    - ``log_prob``: ``"discretised"`` (default), the log-probability of the rounded integer tuple
      under the Gaussian (the score of the action that was taken; lower variance), or
      ``"continuous"``, the Gaussian log-density of ``z`` before rounding (the authors' code).
    - ``baseline``: ``"moving_average"`` of past losses (``baseline_decay``; the first call uses
      its own mean), ``"leave_one_out"`` (the mean loss of the other draws; needs two or more),
      or ``"none"`` (the authors' code).

    ``fix_values=True`` fixes every value at 1 (a buffer), as the sparse layer's ``fix_values``;
    otherwise values are parameters and get the ordinary gradient.

    ``sigma``: how the transformed sigma is read when drawing. ``"variance"`` (default) as the
    sparse layer and §2.1 read it; ``"std"`` as a standard deviation, the authors' REINFORCE
    (``torch.distributions.Normal(means, sigmas)``): a wider initial spread (13.7 against 3.7
    index units at n = 64). ``sigmas()`` returns variances either way.
    """

    def __init__(
        self,
        spec: SparseMatrixSpec,
        *,
        baseline: Baseline = "moving_average",
        log_prob: LogProb = "discretised",
        samples: int = 0,
        baseline_decay: float = 0.9,
        tau: float = 0.1,
        fix_values: bool = False,
        sigma: SigmaForm = "variance",
    ) -> None:
        super().__init__()
        if sigma not in SIGMA_FORMS:
            raise SparseLayerError(f"sigma must be one of {SIGMA_FORMS}, got {sigma!r}")
        self.sigma_form = sigma
        if baseline not in BASELINES:
            raise SparseLayerError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if log_prob not in LOG_PROBS:
            raise SparseLayerError(f"log_prob must be one of {LOG_PROBS}, got {log_prob!r}")
        if samples < 0 or (baseline == "leave_one_out" and samples == 1):
            raise SparseLayerError(
                f"samples must be 0 (one per instance) or >= 1 (>= 2 for leave_one_out), got "
                f"{samples} with {baseline!r}"
            )
        if not 0 <= baseline_decay < 1:
            raise SparseLayerError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        if spec.k < 1:
            raise SparseLayerError(f"spec.k (number of index tuples) must be >= 1, got {spec.k}")
        self.in_shape, self.out_shape = tuple(spec.in_shape), tuple(spec.out_shape)
        self.shape = weight_shape(self.in_shape, self.out_shape)
        self.baseline_kind, self.log_prob_kind = baseline, log_prob
        self.samples, self.decay, self.tau = samples, baseline_decay, tau
        self.means_raw = nn.Parameter(torch.randn(spec.k, len(self.shape)))
        self.sigmas_raw = nn.Parameter(torch.zeros(spec.k))
        if fix_values:
            self.register_buffer("values", torch.ones(spec.k))
        else:
            self.values = nn.Parameter(torch.randn(spec.k))
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_set", torch.zeros((), dtype=torch.bool))
        self._log_prob: Tensor | None = None  # (draws,) from the last training forward
        self._last_sample: Tensor | None = None

    def means(self) -> Tensor:
        """Continuous index tuples in index space, ``(k, r)``."""
        return transform_means(self.means_raw, self.shape)

    def sigmas(self) -> Tensor:
        """Per-dimension variances, ``(k, r)``."""
        scale = transform_sigmas(self.sigmas_raw, self.shape, self.tau)
        return scale if self.sigma_form == "variance" else scale**2

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        means, values = self.means(), self.values  # (k, r), (k,)
        if not self.training:
            return rounded_product(
                x, means.expand(b, -1, -1), values.expand(b, -1), self.in_shape, self.out_shape
            )
        draws_n = self.samples or b  # structures this step: one per instance, or shared
        if b < draws_n or (self.baseline_kind == "leave_one_out" and draws_n < 2):
            raise SparseLayerError(
                f"batch of {b} is too small for {draws_n} draws with baseline {self.baseline_kind!r}"
            )
        sigmas = self.sigmas()  # (k, r) variances
        std = sigmas.sqrt()  # in the "std" form, exactly the transformed sigma
        with torch.no_grad():
            noise = torch.randn(draws_n, *means.shape, device=means.device, dtype=means.dtype)
            z = means + std * noise  # (draws, k, r)
            upper = means.new_tensor(self.shape) - 1
            draws = torch.minimum(z.round().clamp(min=0), upper).long()  # (draws, k, r)
        if self.log_prob_kind == "continuous":
            log_p = torch.distributions.Normal(means, std).log_prob(z).sum((-2, -1))  # (draws,)
        else:
            log_p = discretised_log_prob(draws, means, sigmas, self.shape).sum(-1)  # (draws,)
        self._log_prob = log_p
        self._last_sample = draws[0]
        which = torch.arange(b, device=x.device) % draws_n  # (b,)
        return sparse_mv(x, draws[which], values.expand(b, -1), self.in_shape, self.out_shape)

    def objective(self, per_sample_loss: Tensor) -> Tensor:
        loss = per_sample_loss.mean()
        if self._log_prob is None:  # eval, or the surrogate was already used
            return loss
        log_prob, self._log_prob = self._log_prob, None
        draws_n = log_prob.shape[0]
        with torch.no_grad():
            which = torch.arange(per_sample_loss.shape[0], device=loss.device) % draws_n
            draw_loss = torch.zeros_like(log_prob).index_add_(0, which, per_sample_loss.detach())
            draw_loss /= torch.bincount(which, minlength=draws_n).to(draw_loss)  # (draws,)
            if self.baseline_kind == "leave_one_out":
                base = (draw_loss.sum() - draw_loss) / (draws_n - 1)
            elif self.baseline_kind == "none":
                base = torch.zeros_like(draw_loss)
            else:
                if not self.baseline_set:
                    self.baseline.copy_(draw_loss.mean())
                    self.baseline_set.fill_(True)
                base = self.baseline.clone()
                self.baseline.mul_(self.decay).add_((1 - self.decay) * draw_loss.mean())
            advantage = draw_loss - base  # (draws,)
        return loss + (advantage * log_prob).mean()

    def snapshot(self) -> dict[str, Tensor]:
        """Means, variances ``(k, r)``, values ``(k,)`` and the first draw ``samples (k, r)``."""
        out = {
            "means": self.means().detach().cpu(),
            "sigmas": self.sigmas().detach().cpu(),
            "values": self.values.detach().cpu(),
        }
        if self._last_sample is not None:
            out["samples"] = self._last_sample.cpu()
        return out


class DenseMatrixLayer(StructureLayer):
    """A dense weight of shape ``out_shape + in_shape`` learned directly (the unstructured baseline).

    Initialised like PyTorch's ``nn.Linear`` (uniform in ``+-1/sqrt(fan_in)``), the default that
    the paper's appendix uses for standard layers.
    """

    def __init__(self, spec: SparseMatrixSpec) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(spec.in_shape), tuple(spec.out_shape)
        weight_shape(self.in_shape, self.out_shape)  # validates the spec
        bound = math.prod(self.in_shape) ** -0.5  # 1 / sqrt(fan_in)
        weight = torch.empty(*self.out_shape, *self.in_shape).uniform_(-bound, bound)
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        w = self.weight.reshape(-1, math.prod(self.in_shape))  # (prod(out), prod(in))
        return (x.reshape(b, -1) @ w.T).view(b, *self.out_shape)

    def snapshot(self) -> dict[str, Tensor]:
        return {"weight": self.weight.detach().cpu()}
