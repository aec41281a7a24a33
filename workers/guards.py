"""Pre-run guards: is the agent enabled, is there memory for a session.

A guard that fails yields a reason; the run is then *reported* as skipped
with that reason, never dropped silently as the original's ``exit 0`` did.
"""

from __future__ import annotations

import psutil
import redis

from workers.config import AgentConfig


def enabled_key(project: str, agent: str) -> str:
    """The Redis key of an agent's shared enable flag ("1" or "0")."""
    return f"formulabeat:enabled:{project}:{agent}"


def set_enabled(client: redis.Redis, project: str, agent: str, enabled: bool) -> None:
    """Enable or disable an agent for every host (overrides the config's ``enabled``)."""
    client.set(enabled_key(project, agent), "1" if enabled else "0")


def is_enabled(client: redis.Redis, agent: AgentConfig) -> bool:
    """The shared flag when one was set with enable/disable, else the config's ``enabled``."""
    flag = client.get(enabled_key(agent.project, agent.name))
    if flag is None:
        return agent.enabled
    return flag in (b"1", "1")


def skip_reason(client: redis.Redis, agent: AgentConfig) -> str | None:
    """Why this agent must not run now, or None when it may."""
    if not is_enabled(client, agent):
        return f"agent {agent.key} is disabled (formulabeat enable {agent.project} {agent.name})"
    available_mb = psutil.virtual_memory().available // (1024 * 1024)
    if available_mb < agent.min_memory_mb:
        return (
            f"low memory: {available_mb} MB available, agent {agent.key} "
            f"needs min_memory_mb = {agent.min_memory_mb}"
        )
    return None
