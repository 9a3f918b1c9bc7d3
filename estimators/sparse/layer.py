"""Thin ``nn.Module`` wrappers around ``functional``: the free-parameter and the adaptive layer.

Both sample a fresh random integer structure per forward in training mode and use the rounded
means only (value ``nu_i`` at ``round(mean_i)``) in ``eval()`` mode, so evaluation is
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from estimators.sparse import functional as SF
from estimators.sparse.functional import DEFAULT_TAIL, Normalise, PooledForm, SparseLayerError

__all__ = ["AdaptiveSparseLayer", "SparseLayer"]


class _Sampling(nn.Module):
    """Shapes and sampling hyperparameters shared by both layers."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        a_l: int,
        a_g: int,
        region: Sequence[int] | None,
        tau: float,
        normalise: Normalise,
        pooled: PooledForm,
        tail: float,
        chunk: int | None,
        learn_dims: Sequence[int] | None,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.shape = SF.weight_shape(self.in_shape, self.out_shape)
        self.rank = len(self.shape)
        self.region = SF._region(region, self.shape)
        self.learn_dims = SF._learned(learn_dims, self.rank)
        SF._counts(a_l, a_g)
        if tau < 0:
            raise SparseLayerError(f"tau must be >= 0, got {tau}")
        if normalise not in ("tuple", "pooled"):
            raise SparseLayerError(f"normalise must be 'tuple' or 'pooled', got {normalise!r}")
        SF._pooled_form(pooled, tail)
        self.a_l, self.a_g, self.tau = a_l, a_g, tau
        self.normalise: Normalise = normalise
        self.pooled: PooledForm = pooled
        self.tail = tail
        self.chunk = chunk

    @property
    def samples(self) -> int:
        """``s``, the integer tuples drawn per continuous tuple."""
        return SF.samples_per_tuple(len(self.learn_dims), self.a_l, self.a_g)

    def sample(self, means: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Integer tuples ``(b, k, s, r)`` for index-space means ``(b, k, r)``."""
        return SF.sample_indices(
            means, self.shape, a_l=self.a_l, a_g=self.a_g, region=self.region,
            learn_dims=self.learn_dims, generator=generator,
        )

    def _product(
        self, x: Tensor, means: Tensor, sigmas: Tensor, values: Tensor,
        indices: Tensor | None, generator: torch.Generator | None,
    ) -> Tensor:
        if not self.training:
            return SF.rounded_product(x, means, values, self.in_shape, self.out_shape)
        return SF.sparse_product(
            x, means, sigmas, values, self.in_shape, self.out_shape, a_l=self.a_l, a_g=self.a_g,
            region=self.region, learn_dims=self.learn_dims, indices=indices,
            normalise=self.normalise, pooled=self.pooled, tail=self.tail, chunk=self.chunk,
            generator=generator,
        )

    def extra_repr(self) -> str:
        return (
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, a_l={self.a_l}, "
            f"a_g={self.a_g}, region={self.region}, tau={self.tau}, normalise={self.normalise!r}"
            + (f", pooled={self.pooled!r}, tail={self.tail}" if self.normalise == "pooled" else "")
        )


class SparseLayer(_Sampling):
    """Free-parameter sparse layer: ``k`` learned continuous index tuples (paper §2.1, §3.1).

    Parameters (all ``nn.Parameter``): ``means_raw (k, r)`` (random normal, so the initial means
    spread over the whole tensor), ``sigmas_raw (k,)`` (zero: variance ``softplus(2) * 0.1 * h +
    tau``) and ``values (k,)`` (random normal). ``forward(x: (b, *in_shape)) -> (b, *out_shape)``
    samples each instance's integer tuples independently, so a batch explores ``b`` random graphs.

    ``fix_values=True`` (default False) makes ``values`` a buffer of ones, as the reference code's
    ``fix_values`` option: only the structure is learned. For a 0/1 target such as the identity
    (§3.1) this removes the degenerate optimum in which tuples of opposite-sign values overlap and
    cancel in expectation while their rounded means sit on the wrong entries.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        k: int,
        *,
        a_l: int = 2,
        a_g: int = 2,
        region: Sequence[int] | None = None,
        tau: float = 0.1,
        normalise: Normalise = "tuple",
        pooled: PooledForm = "truncated",
        tail: float = DEFAULT_TAIL,
        chunk: int | None = None,
        learn_dims: Sequence[int] | None = None,
        fix_values: bool = False,
    ) -> None:
        super().__init__(
            in_shape, out_shape, a_l=a_l, a_g=a_g, region=region, tau=tau, normalise=normalise,
            pooled=pooled, tail=tail, chunk=chunk, learn_dims=learn_dims,
        )
        if k < 1:
            raise SparseLayerError(f"k (number of index tuples) must be >= 1, got {k}")
        self.k = k
        self.means_raw = nn.Parameter(torch.randn(k, self.rank))
        self.sigmas_raw = nn.Parameter(torch.zeros(k))
        self.fix_values = fix_values
        self.values: Tensor
        if fix_values:
            self.register_buffer("values", torch.ones(k))
        else:
            self.values = nn.Parameter(torch.randn(k))

    def means(self) -> Tensor:
        """Continuous index tuples in index space, ``(k, r)``."""
        return SF.transform_means(self.means_raw, self.shape)

    def sigmas(self) -> Tensor:
        """Per-dimension variances, ``(k, r)``."""
        return SF.transform_sigmas(self.sigmas_raw, self.shape, self.tau)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, fix_values={self.fix_values}"

    def sample_batch(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """A fresh integer sample ``(batch, k, s, r)`` to pass to ``forward(indices=...)``."""
        return self.sample(self.means().expand(batch, -1, -1), generator)

    def forward(
        self, x: Tensor, indices: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        b = x.shape[0]
        means = self.means().expand(b, -1, -1)  # (b, k, r)
        sigmas = self.sigmas().expand(b, -1, -1)  # (b, k, r)
        values = self.values.expand(b, -1)  # (b, k)
        return self._product(x, means, sigmas, values, indices, generator)


class AdaptiveSparseLayer(_Sampling):
    """Adaptive sparse hyperlayer: a source network gives the parameters per instance (§2).

    ``forward(x (b, *in), means_raw (b, k, r), sigmas_raw (b, k), values (b, k))``: the raw,
    unconstrained outputs go through ``transform_means``/``transform_sigmas``. For means already
    in index space (e.g. a glimpse grid with fixed dimensions) call ``functional.sparse_product``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        a_l: int = 2,
        a_g: int = 2,
        region: Sequence[int] | None = None,
        tau: float = 0.1,
        normalise: Normalise = "tuple",
        pooled: PooledForm = "truncated",
        tail: float = DEFAULT_TAIL,
        chunk: int | None = None,
        learn_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            in_shape, out_shape, a_l=a_l, a_g=a_g, region=region, tau=tau, normalise=normalise,
            pooled=pooled, tail=tail, chunk=chunk, learn_dims=learn_dims,
        )

    def forward(
        self,
        x: Tensor,
        means_raw: Tensor,
        sigmas_raw: Tensor,
        values: Tensor,
        indices: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        means = SF.transform_means(means_raw, self.shape)  # (b, k, r)
        sigmas = SF.transform_sigmas(sigmas_raw, self.shape, self.tau)  # (b, k, r)
        return self._product(x, means, sigmas, values, indices, generator)
