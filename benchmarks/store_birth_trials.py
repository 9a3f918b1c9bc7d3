"""A signal while ``sparsebench run`` creates its store: how many stores are usable afterwards?

Each trial starts ``sparsebench run`` on a fresh home, waits until the store's database file
appears (``mlflow.db``, or the temporary ``.mlflow.db.creating-<pid>`` it is built in: the moment
MLflow starts creating tables), sleeps a delay, sends a signal (TERM, INT or KILL), then opens
the store as the next ``run`` would (``harness.store.client.open_client``, in a fresh process with the
same code). Usable: that open succeeds (no store is fine: the next run creates one). Run it
against any checkout, from outside it (``-m harness.cli`` looks in the working folder first):

    cd /tmp && PYTHONPATH=/path/to/checkout python /path/to/store_birth_trials.py [--delays 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["-m", "harness.cli", "run", "--task", "identity", "--estimator", "sparse", "--size", "8",
       "--set", "tasks.identity.steps=20", "--no-progress", "--threads", "1"]  # fmt: skip
OPEN = "import sys; from harness.store.client import open_client; open_client(sys.argv[1], create=True)"


def _creation_began(home: Path) -> bool:
    return home.is_dir() and any(p.name == "mlflow.db" or ".creating-" in p.name for p in home.iterdir())


def trial(sig: signal.Signals, delay: float) -> tuple[bool, str]:
    """(usable afterwards, what the store looked like)."""
    with tempfile.TemporaryDirectory(prefix="birth-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "SPARSEBENCH_HOME": str(home)}
        env.pop("MLFLOW_TRACKING_URI", None)
        child = subprocess.Popen([sys.executable, *RUN], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 600  # a busy machine takes minutes to import MLflow
        while not _creation_began(home) and child.poll() is None:
            if time.monotonic() > deadline:
                child.kill()
                raise RuntimeError("the store's creation never began")
            time.sleep(0.01)
        time.sleep(delay)
        if child.poll() is None:
            child.send_signal(sig)
        child.communicate(timeout=120)
        db = home / "mlflow.db"
        state = "absent" if not db.exists() else f"{db.stat().st_size} bytes"
        opened = subprocess.run([sys.executable, "-c", OPEN, f"sqlite:///{db}"], env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        why = opened.stderr.strip().splitlines()[-1] if opened.returncode else ""
        return opened.returncode == 0, f"{state}; rc {child.returncode}{'; ' + why[:160] if why else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,0.3,0.6,1,1.5,2,3", help="seconds after creation begins")
    parser.add_argument("--signals", default="TERM,INT,KILL")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    signals = [signal.Signals[f"SIG{s.strip()}"] for s in args.signals.split(",")]
    usable = total = 0
    for sig in signals:
        for delay in delays:
            ok, detail = trial(sig, delay)
            usable += ok
            total += 1
            print(f"{sig.name:8} {delay:4.1f} s  {'usable' if ok else 'UNUSABLE'}  ({detail})", flush=True)
    print(f"{usable} of {total} stores usable afterwards")
    return 0 if usable == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
