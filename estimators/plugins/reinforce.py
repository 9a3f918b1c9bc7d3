"""The ``reinforce`` estimator: score-function gradients, with an optional detached baseline.

- ``sparse_matrix``: ``ReinforceMatrixLayer``, the sparse layer's parametrisation, one sampled
  integer tuple per continuous tuple (the paper's identity baseline, §3.1). With ``samples = 0``,
  ``baseline = "none"``, ``log_prob = "continuous"``, ``fix_values = true`` and ``sigma = "std"``
  it is the authors' estimator (one structure per instance, the Gaussian log-density of the
  unrounded draw, values fixed at 1, as the sparse layer's, sigma read as a standard deviation);
  the defaults add our variance reduction and read sigma as a variance, as the sparse layer does.
- ``glimpse``: ``ReinforceGlimpse``, ours, a one-shot Gaussian policy over the glimpse box (not
  RAM, which is recurrent).
- ``permutation`` from keys: ``PlackettLuceLayer``, permutations sampled from a Plackett-Luce
  distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.special import log_ndtr

from estimators.base import (
    MAX_OUTCOMES,
    Estimator,
    GlimpseLayer,
    GlimpseSpec,
    Outcomes,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    hookimpl,
)
from estimators.shared.glimpse import box_points
from estimators.shared.neuralsort import sort_matrix
from estimators.shared.permutation import check_keys, keys_only
from estimators.shared.plackett_luce import (
    all_orderings,
    perm_matrix,
    plackett_luce_log_prob,
    plackett_luce_sample,
)
from estimators.sparse import SparseLayerError, rounded_product, sparse_mv, weight_shape
from estimators.sparse.functional import transform_means, transform_sigmas

__all__ = [
    "BASELINES",
    "LOG_PROBS",
    "PlackettLuceLayer",
    "ReinforceEstimator",
    "ReinforceGlimpse",
    "ReinforceMatrixLayer",
    "SIGMA_FORMS",
    "discretised_log_prob",
    "register_estimators",
]

Baseline = Literal["moving_average", "leave_one_out", "none"]
LogProb = Literal["discretised", "continuous"]
BASELINES: tuple[Baseline, ...] = ("moving_average", "leave_one_out", "none")
LOG_PROBS: tuple[LogProb, ...] = ("discretised", "continuous")
SigmaForm = Literal["variance", "std"]
SIGMA_FORMS: tuple[SigmaForm, ...] = ("variance", "std")


class ReinforceEstimator(Estimator):
    name: ClassVar[str] = "reinforce"
    description: ClassVar[str] = "score-function (REINFORCE) gradients; the paper's identity baseline"
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "glimpse", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "baseline": "moving_average",  # or "leave_one_out" (two or more draws), or "none"
        "baseline_decay": 0.9,
        # sparse_matrix: "discretised" (score of the rounded tuple) or "continuous" (the authors')
        "log_prob": "discretised",
        "samples": 0,  # sparse_matrix: structures per step; 0 = one per instance (the authors')
        "fix_values": True,  # sparse_matrix: values fixed at 1, like the sparse estimator's
        "tau": 0.1,  # sigma floor, as in the sparse layer
        # sparse_matrix: sigma read as a "variance" (the sparse layer's) or "std" (the authors')
        "sigma": "variance",
        "box_offset": 1.0,  # glimpse: initial box half-width in logit space
        "std": 0.5,  # glimpse: initial policy standard deviation (logit space)
        "learn_std": True,
    }

    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "baseline": ("moving_average", "leave_one_out", "none"),
        "log_prob": ("discretised", "continuous"),
        "sigma": ("variance", "std"),
    }
    positive: ClassVar[tuple[str, ...]] = ("tau", "box_offset", "std")
    non_negative: ClassVar[tuple[str, ...]] = ("samples", "baseline_decay")

    def check(self, params: Mapping[str, Any]) -> None:
        if not params["baseline_decay"] < 1:
            decay = params["baseline_decay"]
            raise ValueError(f"baseline_decay = {decay!r} must be below 1 (it is the weight on the past)")
        if params["baseline"] == "leave_one_out" and params["samples"] == 1:
            raise ValueError(
                "baseline 'leave_one_out' needs samples = 0 (one draw per instance) or >= 2 "
                "(it averages the other draws)"
            )

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, PermutationSpec):
            if spec.source != "keys":
                return "reinforce samples permutations from keys (Plackett-Luce); no free permutation"
            p = {**self.defaults, **(params or {})}
            if p["samples"] != 0 or p["baseline"] == "leave_one_out":  # one draw per instance
                return (
                    "Plackett-Luce draws one permutation per instance (samples = 0) with a "
                    "moving-average or no baseline"
                )
        return super().unsupported(spec, params)

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        return ReinforceMatrixLayer(
            spec,
            baseline=params["baseline"],
            log_prob=params["log_prob"],
            samples=params["samples"],
            baseline_decay=params["baseline_decay"],
            tau=params["tau"],
            fix_values=params["fix_values"],
            sigma=params["sigma"],
        )

    def build_glimpse(self, spec: GlimpseSpec, params: Mapping[str, Any]) -> StructureLayer:
        return ReinforceGlimpse(
            spec,
            box_offset=params["box_offset"],
            std=params["std"],
            learn_std=params["learn_std"],
            baseline_decay=params["baseline_decay"],
            baseline=params["baseline"],
        )

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return PlackettLuceLayer(spec, baseline=params["baseline"], baseline_decay=params["baseline_decay"])


# ---- sparse_matrix ------------------------------------------------------------------------------


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
        self.shared_draws, self.decay, self.tau = samples, baseline_decay, tau
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
        draws_n = self.shared_draws or b  # structures this step: one per instance, or shared
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

    def outcomes(self, *inputs: Tensor) -> Outcomes:
        """Every draw of the k integer tuples (each the rounded, clamped Gaussian sample of its
        continuous tuple, independently) with its probability: the distribution REINFORCE's
        score estimates the gradient under, whichever ``log_prob`` form the score uses."""
        cells = torch.cartesian_prod(*(torch.arange(h) for h in self.shape)).reshape(-1, len(self.shape))
        k = self.means_raw.shape[0]
        if cells.shape[0] ** k > MAX_OUTCOMES:
            raise ValueError(f"{cells.shape[0]}^{k} outcomes is too many to list (at most {MAX_OUTCOMES})")
        cells = cells.to(self.means_raw.device)
        means, sigmas = self.means(), self.sigmas()  # (k, r)
        table = discretised_log_prob(cells[:, None, :], means, sigmas, self.shape)  # (cells, k)
        pick = torch.cartesian_prod(*(torch.arange(len(cells)) for _ in range(k))).reshape(-1, k)
        log_probs = table.gather(0, pick.to(table.device)).sum(-1)  # (m,)
        flat = torch.zeros(len(pick), math.prod(self.shape), dtype=means.dtype, device=means.device)
        strides = torch.tensor([math.prod(self.shape[d + 1 :]) for d in range(len(self.shape))])
        where = (cells[pick.to(cells.device)] * strides.to(cells.device)).sum(-1)  # (m, k) flat index
        flat = flat.index_put((torch.arange(len(pick))[:, None].expand_as(where), where),
                              self.values.expand(len(pick), -1), accumulate=True)
        return Outcomes(flat.reshape(len(pick), *self.shape), log_probs)

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
            advantage = draw_loss - self.baseline_of(draw_loss)  # (draws,)
        return loss + (advantage * log_prob).mean()

    def baseline_of(self, draw_loss: Tensor) -> Tensor:
        """The detached baseline of each draw's loss ``(draws,)``; advances the moving average."""
        if self.baseline_kind == "leave_one_out":
            return (draw_loss.sum() - draw_loss) / (draw_loss.shape[0] - 1)
        if self.baseline_kind == "none":
            return torch.zeros_like(draw_loss)
        if not self.baseline_set:
            self.baseline.copy_(draw_loss.mean())
            self.baseline_set.fill_(True)
        base = self.baseline.clone()
        self.baseline.mul_(self.decay).add_((1 - self.decay) * draw_loss.mean())
        return base

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


# ---- glimpse ------------------------------------------------------------------------------------


class ReinforceGlimpse(GlimpseLayer):
    """Ours: a one-shot Gaussian policy over the box corners, trained with the score function.

    The REINFORCE counterpart of the sparse glimpse (same box, same read-out points); it is not
    RAM, whose recurrent core takes a sequence of glimpses. In training each glimpse's corners are
    sampled from ``N(corners, std)`` in logit space and the glimpse reads the nearest pixels at
    the sampled box, so no gradient flows through the read-out; ``objective`` adds
    ``log p(sample) * (loss - baseline)`` with the baseline detached: ``"moving_average"``
    (default) of the batch loss, ``"leave_one_out"`` (the other instances' mean loss) or
    ``"none"``. ``eval()`` reads at the mean box.

    ``std`` is the initial standard deviation (logit units); it is learned per glimpse and corner
    (as a log-std) unless ``learn_std`` is False.
    """

    def __init__(
        self,
        spec: GlimpseSpec,
        box_offset: float = 1.0,
        std: float = 0.5,
        learn_std: bool = True,
        baseline_decay: float = 0.9,
        baseline: str = "moving_average",
    ) -> None:
        super().__init__(spec, box_offset)
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        if baseline not in ("moving_average", "leave_one_out", "none"):
            raise ValueError(f"baseline must be moving_average, leave_one_out or none, got {baseline!r}")
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        log_std = torch.full((spec.glimpses, 4), math.log(std))
        if learn_std:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)
        self.baseline_decay, self.baseline_kind = baseline_decay, baseline
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        self.last_log_p: torch.Tensor | None = None  # (b,) log-probability of the last sample
        self.last_indices: torch.Tensor | None = None  # (b, g, k, k, 2) pixels read last

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        self.check_input(images, boxes)
        b, c, h, w = images.shape
        g, k = self.spec.glimpses, self.spec.size
        mean = self.corners(boxes)  # (b, g, 4)
        if self.training:
            policy = torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))
            corners = policy.sample()  # (b, g, 4), no gradient
            self.last_log_p = policy.log_prob(corners).sum(dim=(1, 2))  # (b,)
        else:
            corners = mean.detach()
            self.last_log_p = None
        pixels = self.to_pixels(box_points(corners, k), h, w).round().long()  # (b, g, k, k, 2)
        limit = torch.tensor([h - 1, w - 1], device=images.device)
        pixels = torch.minimum(pixels.clamp(min=0), limit)
        self.last_indices = pixels
        flat = (pixels[..., 0] * w + pixels[..., 1]).reshape(b, 1, g * k * k)  # (b, 1, g*k*k)
        out = images.reshape(b, c, h * w).gather(2, flat.expand(b, c, g * k * k))  # (b, c, g*k*k)
        return out.reshape(b, c, g, k, k).transpose(1, 2)  # (b, g, c, k, k)

    def objective(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Mean loss plus the score-function surrogate ``log p * (loss - baseline)``.

        The loss is the negative reward; its gradient reaches the classifier directly and the
        source network (the policy mean) and ``log_std`` through ``log p`` only.
        """
        loss = per_sample_loss.mean()
        if self.last_log_p is None:  # eval mode, or no sample since the last objective
            return loss
        cost = per_sample_loss.detach()  # (b,)
        surrogate = (self.last_log_p * (cost - self.baseline_of(cost))).mean()
        self.last_log_p = None  # one surrogate per sample: never reuse a freed graph
        return loss + surrogate

    def baseline_of(self, cost: torch.Tensor) -> torch.Tensor:
        """The detached baseline of the losses ``(b,)``; advances the moving average."""
        if self.baseline_kind == "none":
            return torch.zeros_like(cost)
        if self.baseline_kind == "leave_one_out":
            return (cost.sum() - cost) / max(len(cost) - 1, 1)  # (b,)
        if not bool(self.baseline_ready):
            self.baseline.copy_(cost.mean())
            self.baseline_ready.fill_(True)
        base = self.baseline.clone()
        decay = self.baseline_decay
        self.baseline.copy_(decay * self.baseline + (1 - decay) * cost.mean())
        return base

    def outcomes(self, *inputs: torch.Tensor) -> Outcomes | None:
        """For one-point glimpses (``size = 1``): every pixel each glimpse can read, for one
        instance's ``images (1, c, h, w)`` and ``boxes (1, g, 4)``, with its probability. The point
        is the box centre, ``(y0 + y1) / 2`` and ``(x0 + x1) / 2`` in logit space: independent
        Gaussians per axis (the corners are), so a pixel's probability is the product of two
        Gaussian cell masses. ``structures`` are the read pixels ``(m, g, 1, 1, 2)`` as
        ``(row, col)``, as the forward reads them. ``None`` for larger glimpses, whose points
        move together (a joint law over the grid that is not listed here)."""
        images, boxes = inputs
        if self.spec.size != 1:
            return None
        h, w = images.shape[-2:]
        g = self.spec.glimpses
        if (h * w) ** g > MAX_OUTCOMES:
            raise ValueError(f"({h} x {w})^{g} outcomes is too many to list (at most {MAX_OUTCOMES})")
        mean = self.corners(boxes)[0]  # (g, 4)
        var = (2 * self.log_std).exp().expand_as(mean)  # (g, 4)
        centre, spread = (mean[:, :2] + mean[:, 2:]) / 2, (var[:, :2] + var[:, 2:]) / 4  # (g, 2)
        rows = _cell_log_probs(centre[:, 0], spread[:, 0], h)  # (g, h)
        cols = _cell_log_probs(centre[:, 1], spread[:, 1], w)  # (g, w)
        pixel = (rows[:, :, None] + cols[:, None, :]).reshape(g, h * w)  # (g, h * w)
        pick = torch.cartesian_prod(*(torch.arange(h * w) for _ in range(g))).reshape(-1, g)
        pick = pick.to(pixel.device)  # (m, g) flat pixel per glimpse
        log_probs = pixel.gather(1, pick.T).sum(0)  # (m,)
        where = torch.stack([pick // w, pick % w], dim=-1)  # (m, g, 2)
        return Outcomes(where[:, :, None, None, :], log_probs)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"std": self.log_std.detach().exp(), "baseline": self.baseline.detach().clone()}


def _cell_log_probs(mean: torch.Tensor, var: torch.Tensor, extent: int) -> torch.Tensor:
    """``log P(round(sigmoid(z) (extent - 1)) = j)`` for ``z ~ N(mean, var)``: ``(g,)`` -> ``(g,
    extent)``. Pixel ``j`` owns ``sigmoid(z) (extent - 1)`` in ``[j - 1/2, j + 1/2)``, the logit
    interval between ``logit((j -+ 1/2) / (extent - 1))``; the edge pixels own the tails."""
    if extent == 1:
        return torch.zeros(mean.shape[0], 1, dtype=mean.dtype, device=mean.device)
    inner = (torch.arange(1, extent, dtype=mean.dtype, device=mean.device) - 0.5) / (extent - 1)
    cdf = torch.special.ndtr((torch.logit(inner) - mean[:, None]) / var.sqrt()[:, None])  # (g, e - 1)
    zero, one = torch.zeros_like(cdf[:, :1]), torch.ones_like(cdf[:, :1])
    mass = torch.cat([cdf, one], 1) - torch.cat([zero, cdf], 1)  # (g, extent)
    return mass.clamp(min=torch.finfo(mass.dtype).tiny).log()


# ---- permutation --------------------------------------------------------------------------------


class PlackettLuceLayer(StructureLayer):
    """REINFORCE over Plackett-Luce orderings of the keys.

    Training: a sampled hard permutation (no gradient through it); ``objective`` adds the
    score-function surrogate ``mean((loss - baseline) * log p)`` with the baseline detached.
    ``baseline="moving_average"`` is a bias-corrected exponential average of *past* batch-mean
    losses (``baseline_decay`` weight on the past, as Adam corrects its moments; 0 before the
    first update), so it never depends on the current sample; ``"none"`` uses 0.
    ``eval()``: the argsort matrix.

    ``samples``: permutations per instance in training (the contract's ``samples``; the task
    repeats every instance that many times, and each row draws its own permutation).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        *,
        baseline: str = "moving_average",
        baseline_decay: float = 0.9,
        samples: int = 1,
    ):
        super().__init__()
        reason = self.unsupported(spec)
        if reason:
            raise ValueError(reason)
        if baseline not in ("moving_average", "none"):
            raise ValueError(f"baseline must be 'moving_average' or 'none', got {baseline!r}")
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must lie in [0, 1), got {baseline_decay}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1 (permutations per instance), got {samples}")
        self.spec, self.baseline_kind, self.decay = spec, baseline, baseline_decay
        self.samples = samples
        self.register_buffer("average", torch.zeros(()))  # uncorrected moving average
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._log_prob: torch.Tensor | None = None

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        return keys_only(spec, "plackett-luce")

    def forward(
        self, keys: torch.Tensor, generator: torch.Generator | None = None
    ) -> PermutationOutput:
        check_keys(keys, self.spec.n)
        if not self.training:
            self._log_prob = None
            return PermutationOutput(steps=[sort_matrix(keys.detach())])
        perm = plackett_luce_sample(keys, generator=generator)  # (b, n), no gradient
        self._log_prob = plackett_luce_log_prob(keys, perm)  # (b,)
        return PermutationOutput(
            steps=[perm_matrix(perm, keys.dtype)], extras={"log_prob": self._log_prob}
        )

    def objective(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return per_sample_loss.mean()
        if self._log_prob is None or self._log_prob.shape != per_sample_loss.shape:
            expected = None if self._log_prob is None else tuple(self._log_prob.shape)
            raise RuntimeError(
                "PlackettLuceLayer.objective needs the per-instance losses of the last training "
                f"forward (shape {expected}), got {tuple(per_sample_loss.shape)}"
            )
        loss = per_sample_loss.detach()
        surrogate = ((loss - self.baseline_of(loss)) * self._log_prob).mean()
        self._log_prob = None  # one objective per forward
        return per_sample_loss.mean() + surrogate

    def baseline_of(self, loss: torch.Tensor) -> torch.Tensor:
        """The detached baseline of the losses ``(b,)`` (here of past losses only); advances the
        moving average."""
        base = self.baseline()
        if self.baseline_kind == "moving_average":
            with torch.no_grad():
                self.average.mul_(self.decay).add_((1.0 - self.decay) * loss.mean())
                self.updates.add_(1)
        return base

    def outcomes(self, *inputs: torch.Tensor) -> Outcomes:
        """All ``n!`` orderings of one instance's keys ``(1, n)`` under Plackett-Luce."""
        (keys,) = inputs
        perms, log_probs = all_orderings(keys)
        return Outcomes(perm_matrix(perms, keys.dtype), log_probs)

    def baseline(self) -> torch.Tensor:
        """The current (detached) baseline, a scalar."""
        if int(self.updates) == 0:
            return torch.zeros_like(self.average)
        return self.average / (1.0 - self.decay ** int(self.updates))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"baseline": self.baseline()}


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(ReinforceEstimator())
