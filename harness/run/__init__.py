"""The run of one cell (``cell``) and of a matrix (``runner``), with its progress and summary."""
