"""The agent CLIs formulabeat drives, by name: one module per CLI.

Every module of this package that defines ``DRIVER`` (an instance of a class
implementing :class:`workers.agents.base.AgentDriver`) is a driver: another
CLI is one more module, found here without a list to edit. A config's
``[[agents]] driver`` names one; without it, the driver whose ``programs``
include the command's program is used, else ``plain``. The config only
carries the name: :func:`checked` is where a name is judged, so the drivers
depend on the config and not the other way round.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from workers.agents.base import AgentDriver, Launch, PromptDriver
from workers.config import AgentConfig, Config
from workers.errors import ConfigError


def _discover() -> dict[str, AgentDriver]:
    found: dict[str, AgentDriver] = {PromptDriver.name: PromptDriver()}
    for module in pkgutil.iter_modules(__path__):
        driver = getattr(importlib.import_module(f"{__name__}.{module.name}"), "DRIVER", None)
        if driver is not None:
            found[driver.name] = driver
    return found


DRIVERS: dict[str, AgentDriver] = _discover()

__all__ = ["DRIVERS", "AgentDriver", "Launch", "checked", "driver_for", "driver_name"]


def driver_name(agent: AgentConfig) -> str:
    """The agent's driver: the one it names, else the one for its command's program."""
    if agent.driver:
        return agent.driver
    program = Path(agent.argv()[0]).name
    for name, driver in DRIVERS.items():
        if program in driver.programs:
            return name
    return PromptDriver.name


def driver_for(agent: AgentConfig) -> AgentDriver:
    """The agent's driver (a config that went through :func:`checked` names a known one)."""
    name = driver_name(agent)
    try:
        return DRIVERS[name]
    except KeyError:
        raise ConfigError("the config", f"agents ({agent.key}).driver", _unknown(name)) from None


def checked(cfg: Config) -> Config:
    """``cfg``, once every agent's driver is known; else a ConfigError naming the agent."""
    for index, agent in enumerate(cfg.agents):
        if driver_name(agent) not in DRIVERS:
            key = f"agents[{index}] ({agent.key}).driver"
            raise ConfigError(cfg.path, key, _unknown(driver_name(agent)))
    return cfg


def _unknown(name: str) -> str:
    return f"{name!r} is not a driver: use one of {', '.join(sorted(DRIVERS))}"
