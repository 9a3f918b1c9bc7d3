"""``StructureLayer``s and the relaxations behind them, shared by the built-in estimator plugins.

Not plugins themselves (nothing here registers anything) and not part of the harness-free sparse
library (``estimators.sparse``); a third-party estimator may reuse them like any library code.
"""
