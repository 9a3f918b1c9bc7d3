"""``StructureLayer``s for the ``permutation`` kind: quicksort, Gumbel-Sinkhorn, NeuralSort, PL.

Every layer returns a ``PermutationOutput`` with ``x_sorted = output.matrix @ x`` (ascending
order). In ``eval()`` mode every layer returns hard permutation matrices. The functional maths
lives in ``estimators.sparse.quicksort``, ``estimators.layers.sinkhorn``, ``estimators.layers.neuralsort`` and
``estimators.layers.plackett_luce``; these classes only validate, pick train or eval behaviour and keep
state (learned logits, the REINFORCE baseline). Layers that draw noise take an optional
``generator`` in ``forward`` so that tests can fix the sample.

Each class offers ``unsupported(spec)``: the reason it cannot serve a spec, or ``None``; an
estimator's own ``unsupported`` can return it, and the constructor raises ``ValueError`` with it.
"""

from __future__ import annotations

import torch
from torch import nn

from estimators.base import PermutationOutput, PermutationSpec, StructureLayer
from estimators.layers.neuralsort import neuralsort, sort_matrix
from estimators.layers.plackett_luce import perm_matrix, plackett_luce_log_prob, plackett_luce_sample
from estimators.layers.sinkhorn import gumbel_sinkhorn, hungarian
from estimators.sparse.quicksort import quicksort

__all__ = ["GumbelSinkhornLayer", "NeuralSortLayer", "PlackettLuceLayer", "QuicksortLayer"]


def _keys_only(spec: PermutationSpec, name: str) -> str | None:
    if spec.source != "keys":
        return f"{name} sorts by keys; it has no free (source={spec.source!r}) permutation"
    return None


def _check_keys(keys: torch.Tensor, n: int) -> None:
    if keys.dim() != 2 or keys.shape[1] != n:
        raise ValueError(f"keys must have shape (batch, {n}), got {tuple(keys.shape)}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


class QuicksortLayer(StructureLayer):
    """The paper's differentiable quicksort: ``log2 n`` sampled half-permutations (section 3.3).

    ``steps`` holds the half-permutations in order of application and the output is marked
    ``intermediate``: a task may put its loss on every intermediate state through the output's
    ``intermediate_inputs(x)`` and ``intermediate_targets(target)`` (sum ``BCE(x_d, t_d)`` over the
    pairs; clamping into ``(0, 1)`` first is the task's job, paper footnote 8).
    ``extras["keys"]`` is ``(b, log2 n + 1, n)``, the keys after every step.
    """

    def __init__(self, spec: PermutationSpec, *, C: float = 10.0, samples: int | None = None):
        super().__init__()
        reason = self.unsupported(spec)
        if reason:
            raise ValueError(reason)
        _positive("C", C)
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be >= 1 (or None for n), got {samples}")
        self.spec, self.C, self.samples = spec, C, samples
        self._last: torch.Tensor | None = None

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        if reason := _keys_only(spec, "quicksort"):
            return reason
        n = spec.n
        if n < 2 or n & (n - 1):
            return f"quicksort needs n to be a power of two >= 2, got n={n}"
        return None

    def forward(
        self, keys: torch.Tensor, generator: torch.Generator | None = None
    ) -> PermutationOutput:
        _check_keys(keys, self.spec.n)
        steps, trace = quicksort(
            keys, C=self.C, samples=self.samples, generator=generator, hard=not self.training
        )
        self._last = torch.stack([s[0].detach() for s in steps])  # (log2 n, n, n), instance 0
        return PermutationOutput(steps=steps, extras={"keys": trace}, intermediate=True)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {} if self._last is None else {"steps": self._last}


class GumbelSinkhornLayer(StructureLayer):
    """Gumbel-Sinkhorn (Mena et al. 2018) from per-item scores or from learned ``n x n`` logits.

    ``source="keys"``: as Mena et al.'s networks, the task's network gives every item ``n`` scores,
    one per output position (``scores_per_item = n``); ``forward(scores: (b, n, n))`` with
    ``scores[:, j, k]`` item ``j``'s score for position ``k``. Mena et al.'s operator runs on that
    item-major matrix (rows first, as ``google/gumbel_sinkhorn``'s ``sinkhorn_ops.py``) and the
    result is transposed into this package's convention ``x_sorted = P @ x`` (rows = positions);
    Mena et al. normalise the item-major columns last, so every output row sums to 1 exactly.
    ``source="free"`` learns the position-major logits and ``forward(batch_size)`` draws one noisy
    matrix per instance. ``eval()``: the Hungarian solution of the noiseless scores.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        *,
        temperature: float = 1.0,
        iterations: int = 20,
        noise: float = 1.0,
    ):
        super().__init__()
        _positive("temperature", temperature)
        _positive("iterations", iterations)
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.spec, self.temperature, self.iterations, self.noise = (
            spec,
            temperature,
            iterations,
            noise,
        )
        self.scores_per_item = spec.n if spec.source == "keys" else 1
        # small random logits break the symmetry of an all-zero start when noise is 0
        self.logits = (
            nn.Parameter(0.01 * torch.randn(spec.n, spec.n)) if spec.source == "free" else None
        )
        self._last: torch.Tensor | None = None

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        return None

    def forward(
        self, inputs: torch.Tensor | int, generator: torch.Generator | None = None
    ) -> PermutationOutput:
        if self.logits is None:
            n = self.spec.n
            if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or inputs.shape[1:] != (n, n):
                got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else inputs
                raise ValueError(
                    f"GumbelSinkhornLayer(source='keys') takes scores of shape (batch, {n}, {n}): "
                    f"{n} per item, one per output position; got {got!r}"
                )
            item_major, transpose = inputs, True  # (b, n items, n positions)
        else:
            if isinstance(inputs, torch.Tensor) or inputs < 1:
                raise TypeError(
                    f"GumbelSinkhornLayer(source='free') takes a batch size, got {inputs!r}"
                )
            item_major, transpose = self.logits.expand(inputs, -1, -1), False  # position-major
        if self.training:
            matrix = gumbel_sinkhorn(
                item_major,
                temperature=self.temperature,
                iterations=self.iterations,
                noise=self.noise,
                generator=generator,
            )
        elif self.logits is None:
            matrix = hungarian(item_major)
        else:  # one assignment serves every instance of the free permutation
            matrix = hungarian(self.logits.unsqueeze(0)).expand(inputs, -1, -1)
        if transpose:
            matrix = matrix.transpose(-1, -2)  # (b, positions, items)
        self._last = matrix[0].detach()
        return PermutationOutput(steps=[matrix])

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {} if self._last is None else {"matrix": self._last}
        if self.logits is not None:
            out["logits"] = self.logits.detach()
        return out


class NeuralSortLayer(StructureLayer):
    """NeuralSort (Grover et al. 2019), deterministic; ``eval()``: the argsort matrix."""

    def __init__(self, spec: PermutationSpec, *, tau: float = 1.0):
        super().__init__()
        reason = self.unsupported(spec)
        if reason:
            raise ValueError(reason)
        _positive("tau", tau)
        self.spec, self.tau = spec, tau

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        return _keys_only(spec, "neuralsort")

    def forward(self, keys: torch.Tensor) -> PermutationOutput:
        _check_keys(keys, self.spec.n)
        matrix = neuralsort(keys, self.tau) if self.training else sort_matrix(keys.detach())
        return PermutationOutput(steps=[matrix])


class PlackettLuceLayer(StructureLayer):
    """REINFORCE over Plackett-Luce orderings of the keys.

    Training: a sampled hard permutation (no gradient through it); ``objective`` adds the
    score-function surrogate ``mean((loss - baseline) * log p)`` with the baseline detached.
    ``baseline="moving_average"`` is a bias-corrected exponential average of *past* batch-mean
    losses (``baseline_decay`` weight on the past, as Adam corrects its moments; 0 before the
    first update), so it never depends on the current sample; ``"none"`` uses 0.
    ``eval()``: the argsort matrix.

    ``samples`` must be 1: the contract gives one matrix and one loss per instance, so extra
    samples per instance have nowhere to go.
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
        if samples != 1:
            raise ValueError(
                f"samples={samples}: PlackettLuceLayer draws one permutation per instance"
            )
        self.spec, self.baseline_kind, self.decay = spec, baseline, baseline_decay
        self.register_buffer("average", torch.zeros(()))  # uncorrected moving average
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._log_prob: torch.Tensor | None = None

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        return _keys_only(spec, "plackett-luce")

    def forward(
        self, keys: torch.Tensor, generator: torch.Generator | None = None
    ) -> PermutationOutput:
        _check_keys(keys, self.spec.n)
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
        surrogate = ((loss - self.baseline()) * self._log_prob).mean()
        if self.baseline_kind == "moving_average":
            with torch.no_grad():
                self.average.mul_(self.decay).add_((1.0 - self.decay) * loss.mean())
                self.updates.add_(1)
        self._log_prob = None  # one objective per forward
        return per_sample_loss.mean() + surrogate

    def baseline(self) -> torch.Tensor:
        """The current (detached) baseline, a scalar."""
        if int(self.updates) == 0:
            return torch.zeros_like(self.average)
        return self.average / (1.0 - self.decay ** int(self.updates))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"baseline": self.baseline()}
