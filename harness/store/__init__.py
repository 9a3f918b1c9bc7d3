"""The tracking store: opening a client (``client``), writing runs (``tracking``), claims and the
heartbeat lease (``claims``, ``lease``), checkpoints, the tracking server and the dashboard's URLs."""
