"""Pure functions that several built-in estimators share, one module per topic.

``sinkhorn`` (Gumbel-Sinkhorn and the Hungarian hard limit), ``neuralsort`` (its relaxation and the
hard sort matrix), ``plackett_luce`` (sampling orderings and their log-probability), ``permutation``
(what every permutation layer checks), ``glimpse`` (where a box's read-out points lie) and
``score_function`` (the leave-one-out baseline over several samples of an instance). No layers
and no plugins live here; each estimator keeps its own in ``estimators.plugins.<name>``. Not part of
the harness-free sparse library (``estimators.sparse``); a third-party estimator may reuse them like
any library code.
"""
