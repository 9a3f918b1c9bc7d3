"""``Estimator.build``: the ``unsupported`` guard runs once, in the base class, before the builder of
the spec's kind; estimators that override ``build`` itself keep their own guard."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from estimators.base import (
    Estimator,
    GlimpseSpec,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    Unsupported,
)

MATRIX = SparseMatrixSpec((4,), (3,), k=4)


class Scaled(StructureLayer):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class MatrixOnly(Estimator):
    """Serves sparse matrices with at most ``limit`` rows; records what reached its builder."""

    name = "matrix_only"
    kinds = frozenset({"sparse_matrix"})
    defaults = {"scale": 2.0, "limit": 8}

    def __init__(self) -> None:
        self.built: list[Spec] = []

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, SparseMatrixSpec) and params and spec.out_shape[0] > params["limit"]:
            return f"more than {params['limit']} rows"
        return super().unsupported(spec, params)

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        self.built.append(spec)
        return Scaled(params["scale"])


def test_build_calls_the_builder_of_the_specs_kind_with_the_params():
    est = MatrixOnly()
    layer = est.build(MATRIX, dict(est.defaults))
    assert isinstance(layer, Scaled) and layer.scale.item() == 2.0
    assert est.built == [MATRIX]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (PermutationSpec(n=4, source="keys"), r"matrix_only builds \['sparse_matrix'\], not permutation"),
        (GlimpseSpec((1, 8, 8), size=2, glimpses=1), "not glimpse"),
        (SparseMatrixSpec((4,), (9,), k=4), "more than 8 rows"),
    ],
    ids=["kind-not-claimed", "other-kind", "own-reason"],
)
def test_build_raises_unsupporteds_reason_before_any_builder_runs(spec, reason):
    est = MatrixOnly()
    with pytest.raises(Unsupported, match=reason):
        est.build(spec, dict(est.defaults))
    assert est.built == []


def test_a_claimed_kind_without_its_builder_names_the_missing_method():
    class Forgetful(Estimator):
        name = "forgetful"
        kinds = frozenset({"permutation"})

    missing = "forgetful claims permutation but defines no build_permutation"
    with pytest.raises(NotImplementedError, match=missing):
        Forgetful().build(PermutationSpec(n=4, source="keys"), {})


def test_an_estimator_that_overrides_build_keeps_its_own_guard():
    class Direct(Estimator):
        name = "direct"
        kinds = frozenset({"sparse_matrix"})

        def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
            if reason := self.unsupported(spec, params):
                raise Unsupported(f"direct: {reason}")
            return Scaled(3.0)

    assert Direct().build(MATRIX, {}).scale.item() == 3.0
    with pytest.raises(Unsupported, match="direct: direct builds"):
        Direct().build(PermutationSpec(n=4, source="keys"), {})
