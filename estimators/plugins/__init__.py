"""The built-in estimator plugins, one module each: the ``Estimator``, its layers for every kind it
serves, and ``register_estimators``, exactly as a third-party plugin does
(``harness.plugins.DEFAULT_PLUGINS``). Maths several of them share is in ``estimators.shared``."""
