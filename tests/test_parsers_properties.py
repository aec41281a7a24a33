"""Property tests: the config and hook payload parsers never fail with anything but their error."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from workers import hooks
from workers.config import parse_config
from workers.errors import ConfigError

toml_values = st.recursive(
    st.none().map(lambda _: '""')
    | st.integers(-(10**6), 10**6).map(str)
    | st.booleans().map(lambda b: "true" if b else "false")
    | st.text(max_size=20).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=5,
)
keys = st.sampled_from(
    [
        "name",
        "project",
        "formula",
        "schedule",
        "command",
        "min_memory_mb",
        "idle_timeout",
        "enabled",
        "context",
        "repo_root",
        "url",
        "socket",
        "port",
        "mode",
        "nonsense",
    ]
)
tables = st.sampled_from(
    ["[[projects]]", "[[agents]]", "[broker]", "[tmux]", "[flower]", "[monitor]", ""]
)


@given(st.lists(st.tuples(tables, keys, toml_values), max_size=8))
@settings(max_examples=200)
def test_any_structured_config_parses_or_raises_config_error(
    entries: list[tuple[str, str, str]],
) -> None:
    text = "\n".join(f"{table}\n{key} = {value}" for table, key, value in entries)
    try:
        parse_config(text, Path("/etc/formulabeat.toml"))
    except ConfigError as exc:
        assert str(exc).startswith("/etc/formulabeat.toml")


@given(st.text(max_size=300))
def test_any_text_config_parses_or_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text, Path("/x/formulabeat.toml"))


@given(
    st.sampled_from(
        ["stop", "post-tool-use", "stop-failure", "guard", "session-end", "session-start"]
    ),
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from(["tool_name", "tool_input", "error", "cwd", "source", "reason"]),
            st.one_of(
                st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=5))
            ),
            max_size=5,
        ).map(lambda d: __import__("json").dumps(d).encode()),
    ),
)
@settings(max_examples=150, deadline=None)
def test_hook_payloads_never_crash_a_hook(name: str, payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        (run_dir / "phase").write_text("")
        saved = sys.stdin
        # Never type into the terminal of whoever runs the tests inside tmux.
        saved_env = {k: os.environ.pop(k) for k in ("TMUX", "TMUX_PANE") if k in os.environ}
        sys.stdin = io.TextIOWrapper(io.BytesIO(payload))
        try:
            code = hooks.main([name, "--run-dir", str(run_dir)])
        finally:
            sys.stdin = saved
            os.environ.update(saved_env)
        assert code in (0, 1, 2)
