"""The forge (Forgejo/Gitea): the agent's identity, and git's credentials.

The token never goes into a URL, an argument vector, a config file or a log:
the API gets it in an ``Authorization`` header, and git gets an
``http.extraHeader`` through ``GIT_CONFIG_*`` environment variables.
"""

from __future__ import annotations

import base64
import logging

import requests

log = logging.getLogger("formulabeat.forge")
API_TIMEOUT = 10.0


def resolve_identity(forge_url: str, token: str, timeout: float = API_TIMEOUT) -> str | None:
    """The login that owns ``token`` (``GET /api/v1/user``), or None when it cannot be had."""
    url = f"{forge_url.rstrip('/')}/api/v1/user"
    try:
        response = requests.get(url, headers={"Authorization": f"token {token}"}, timeout=timeout)
    except requests.RequestException as exc:
        log.warning("forge identity: %s unreachable (%s)", url, type(exc).__name__)
        return None
    if response.status_code != 200:
        log.warning("forge identity: %s answered %s", url, response.status_code)
        return None
    try:
        login = response.json().get("login")
    except (ValueError, AttributeError):
        login = None
    if not isinstance(login, str) or not login:
        log.warning("forge identity: %s gave no login", url)
        return None
    return login


def git_auth_env(login: str, token: str) -> dict[str, str]:
    """Environment that makes git authenticate by header, never prompting."""
    basic = base64.b64encode(f"{login}:{token}".encode()).decode()
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
        "GIT_TERMINAL_PROMPT": "0",
    }


def repo_url(forge_url: str, owner_repo: str) -> str:
    """The clone URL of ``owner/name`` on the forge (no credentials in it, ever)."""
    return f"{forge_url.rstrip('/')}/{owner_repo}.git"
