"""Where claimed cells run: the backend protocol and the in-process backend (``base``), a local
process pool (``pool``), Ray (``ray_backend``) and the order cells start in (``schedule``)."""
