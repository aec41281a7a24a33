"""What the tmux pane runs: read the run's launch file, then exec the agent.

The agent's argument vector and environment (which may hold tokens) travel in
a 0600 file in the run's private directory, so they never appear in tmux's
command line, in ``ps`` output, or in the tmux session environment that other
sessions on the server can read. Standard library only: it runs in every pane.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Exec the agent described by the launch file named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.launcher LAUNCH_FILE", file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8") as handle:
            spec = json.load(handle)
        command = [str(word) for word in spec["argv"]]
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in spec.get("env", {}).items()})
        os.chdir(spec["cwd"])
        exit_file = spec.get("exit_file")
        if exit_file:
            # tmux 3.3 sometimes marks a pane dead without its exit status: a
            # shell parent (a few hundred KB) writes it down for the monitor.
            env["FORMULABEAT_EXIT_FILE"] = str(exit_file)
            script = '"$@"; code=$?; printf %s "$code" > "$FORMULABEAT_EXIT_FILE"; exit "$code"'
            command = ["/bin/sh", "-c", script, "formulabeat-agent", *command]
        os.execvpe(command[0], command, env)
    except FileNotFoundError as exc:
        print(f"formulabeat: cannot start the agent: {exc.filename}: not found", file=sys.stderr)
    except (OSError, KeyError, ValueError) as exc:
        print(f"formulabeat: cannot start the agent: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
