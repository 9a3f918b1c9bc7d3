# The conformance fixture (``sparsebench_check``) that sparsebench ships for plugin test suites.
pytest_plugins = ["harness.testing"]
