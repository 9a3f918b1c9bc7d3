"""Fuzzing the command line and the config file (hypothesis): whatever a user types, ``sparsebench``
ends with exit code 0 or 2 and, for 2, one line on stderr; never a traceback.

Only ``list`` and ``run --dry-run`` are fuzzed: they parse, load plugins and resolve the whole
matrix (where every value is checked) without touching a store.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.plugins import load

REGISTRY = load()
SCOPES = {
    **{f"tasks.{n}": r.obj.defaults for n, r in REGISTRY.tasks.items()},
    **{f"estimators.{n}": r.obj.defaults for n, r in REGISTRY.estimators.items()},
}
KEYS = sorted({f"{scope}.{key}" for scope, defaults in SCOPES.items() for key in defaults})
NAMES = [*REGISTRY.tasks, *REGISTRY.estimators, "nosuch", ""]

scalars = st.one_of(
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.booleans(),
    st.text(alphabet="abcdefgh_ .,=[]{}'\"", max_size=6),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["n", "glimpse", "task", "match", "lr", "x"]), inner, max_size=2),
    ),
    max_leaves=6,
)


def toml(value: Any) -> str:
    """A TOML literal for a fuzzed value (inline tables and arrays nest)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"


set_items = st.one_of(
    st.builds(
        lambda k, v: f"{k}={toml(v)}",
        st.sampled_from(KEYS + ["matrix.seeds", "matrix.tasks", "overrides", "tasks.identity.variants"]),
        values,
    ),
    st.text(max_size=20),  # anything at all, '=' or not
)
tokens = st.one_of(
    st.sampled_from(
        [
            "--task",
            "--estimator",
            "--size",
            "--seeds",
            "--preset",
            "--threads",
            "--device",
            "--checkpoint-minutes",
            "--checkpoint-steps",
            "--stale-after",
            "--force",
            "-x",
            "--",
        ]
    ),
    st.sampled_from(NAMES + ["quick", "paper", "0,1", "4", "-1", "nan", "a,b", ",", "cpu", "8,16"]),
    st.builds(lambda item: ["--set", item], set_items),
)


def _flatten(items: list) -> list[str]:
    out: list[str] = []
    for item in items:
        out.extend(item if isinstance(item, list) else [item])
    return out


def _ends_cleanly(argv: list[str], capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # pragma: no cover - main returns codes, it never exits
        pytest.fail(f"main raised SystemExit({e.code}) for {argv!r}")
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (argv, err)


FUZZ = settings(
    max_examples=int(os.environ.get("SPARSEBENCH_FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(command=st.sampled_from([["list"], ["run", "--dry-run"]]), args=st.lists(tokens, max_size=6))
def test_any_command_line_ends_in_0_or_2(command, args, capsys, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_HOME", tempfile.gettempdir() + "/sparsebench-fuzz-never-written")
    _ends_cleanly([*command, "--task", "identity", *_flatten(args)], capsys)


tables = st.dictionaries(
    st.sampled_from(["matrix", "tasks", "estimators", "overrides", "bogus"]),
    st.one_of(
        values,
        st.dictionaries(
            st.sampled_from([*REGISTRY.tasks, *REGISTRY.estimators, "tasks", "seeds", "nosuch"]),
            st.one_of(
                values,
                st.dictionaries(
                    st.sampled_from(sorted({k.rsplit(".", 1)[1] for k in KEYS})), values, max_size=3
                ),
            ),
            max_size=3,
        ),
    ),
    max_size=3,
)


def render(config: dict[str, Any]) -> str:
    """A TOML document: top-level scalars as keys, tables as inline tables (valid TOML either way)."""
    return "\n".join(f"{key} = {toml(value)}" for key, value in config.items()) + "\n"


@FUZZ
@given(config=tables, raw=st.binary(max_size=40), use_raw=st.booleans())
def test_any_config_file_ends_in_0_or_2(config, raw, use_raw, capsys, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_HOME", tempfile.gettempdir() + "/sparsebench-fuzz-never-written")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.toml"
        path.write_bytes(raw if use_raw else render(config).encode())
        _ends_cleanly(["run", "--dry-run", "--task", "identity", "--config", str(path)], capsys)
