"""Take docs/flower.png: Flower showing live runs' phases, by headless Chromium.

Run from the repository root with the venv's Python:
``.venv/bin/python docs/screenshot.py`` (needs /usr/bin/chromium).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.app import redis_client
from tasks.demo import make_demo_project
from tasks.stack import Stack
from workers import registry
from workers.config import CONFIG_ENV, load_config
from workers.tmux import TmuxServer

OUT = Path(__file__).resolve().parent / "flower.png"


def main() -> int:
    """Start a demo stack whose predictor waits in AWAITING_CI, and photograph Flower."""
    import os

    root = Path(tempfile.mkdtemp(prefix="formulabeat-shot-"))
    config = make_demo_project(
        root,
        {"predictor": "sleep=0.5 phase=awaiting_ci sleep=40 phase=done", "gardener": "phase=done"},
    )
    os.environ[CONFIG_ENV] = str(config)
    cfg = load_config(config)
    stack = Stack(cfg, log_dir=cfg.state_dir / "logs")
    try:
        stack.start()
        client = redis_client(cfg)
        deadline = time.monotonic() + 60
        run_id = ""
        while time.monotonic() < deadline:
            runs = {s["agent"]: s for s in registry.recent(client, 20)}
            predictor = runs.get("predictor", {})
            if predictor.get("state") == "AWAITING_CI" and len(runs) >= 4:
                run_id = predictor["run_id"]
                break
            time.sleep(0.5)
        time.sleep(2)  # let Flower take in the events
        assert requests.get(stack.flower_url, timeout=10).status_code == 200
        profile = root / "chromium-profile"
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--window-size=1300,900",
                "--virtual-time-budget=8000",
                f"--screenshot={OUT}",
                f"{stack.flower_url}task/{run_id}",
            ],
            check=True,
            timeout=120,
            capture_output=True,
        )
        print(f"wrote {OUT}")
        return 0
    finally:
        stack.stop()
        TmuxServer(cfg.tmux_socket).shut_down()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
