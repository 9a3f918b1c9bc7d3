"""The built-in estimator plugins: each module registers one ``Estimator`` through
``register_estimators``, exactly as a third-party plugin does (``harness.plugins.DEFAULT_PLUGINS``)."""
