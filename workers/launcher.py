"""What the tmux pane runs: read the run's launch file, then exec the agent.

The agent's argument vector and environment (which may hold tokens) travel in
a 0600 file in the run's private directory, so they never appear in tmux's
command line, in ``ps`` output, or in the tmux session environment that other
sessions on the server can read.

The launch file holds the agent's *whole* environment. A pane inherits the
environment of whichever process started the tmux server (a person's shell,
another HOME, exported secrets); of that, only what tmux sets for the pane
itself is kept. Standard library only, run as ``python -I -S launcher.py``.
"""

from __future__ import annotations

import json
import os
import sys

# What tmux sets for the pane: the hooks need TMUX and TMUX_PANE to find the
# agent's pane, and TERM names the terminal tmux emulates.
FROM_PANE = ("TMUX", "TMUX_PANE", "TERM")
LINGER_SECONDS = 0.3


def agent_environment(spec_env: dict[str, str], pane_env: dict[str, str]) -> dict[str, str]:
    """The agent's environment: the launch file's, plus what tmux set for the pane."""
    env = {name: pane_env[name] for name in FROM_PANE if name in pane_env}
    env.update({str(k): str(v) for k, v in spec_env.items()})
    return env


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
        env = agent_environment(spec.get("env", {}), dict(os.environ))
        os.chdir(spec["cwd"])
        # Below the worker's priority: an agent at work must not starve the
        # process that reports its phases and renews its lease.
        os.nice(int(spec.get("nice", 0)))
        exit_file = spec.get("exit_file")
        if exit_file:
            # tmux 3.3 sometimes marks a pane dead without its exit status: a
            # shell parent (a few hundred KB) writes it down for the monitor,
            # then holds the pty a moment: tmux drops what an agent printed
            # just before it exited (a refusal, a login error) once the pty
            # closes before it has read it.
            env["FORMULABEAT_EXIT_FILE"] = str(exit_file)
            script = (
                '"$@"; code=$?; printf %s "$code" > "$FORMULABEAT_EXIT_FILE"; '
                f'sleep {LINGER_SECONDS}; exit "$code"'
            )
            command = ["/bin/sh", "-c", script, "formulabeat-agent", *command]
        # PATH is the agent's, not the pane's: look the program up in it.
        os.execvpe(command[0], command, env)
    except FileNotFoundError as exc:
        print(f"formulabeat: cannot start the agent: {exc.filename}: not found", file=sys.stderr)
    except (OSError, KeyError, ValueError) as exc:
        print(f"formulabeat: cannot start the agent: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
