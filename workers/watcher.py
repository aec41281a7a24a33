"""One watcher per host: every live session, on one thread, woken by inotify.

The original ran a bash loop per session polling every 10 s; a Celery task
per session would hold a worker slot for hours. Here one thread per worker
process follows all of its host's sessions. One inotify instance over the
run directories wakes it the moment an agent writes its phase file, a hook
appends to its journal or drops a marker, or the launcher records an exit.
What events cannot see (a tmux server that died, a pane killed from outside,
a cancel request from another host, the clocks, the lease) is checked for all
sessions at once at the liveness interval: one tmux command and one Redis
round trip, whatever the number of sessions.

The watcher never blocks on a session's end: it hands the session and how it
ended to ``on_end``, which the task layer makes quick (it queues the rest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable

import redis
from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from workers import registry
from workers.config import MonitorConfig
from workers.errors import SessionError
from workers.monitor import MonitorExit, SessionWatch, WatchEnd
from workers.rundir import WAKE_NAMES
from workers.tmux import TmuxServer

log = logging.getLogger("formulabeat.watcher")

_MASK = (
    inotify_flags.CLOSE_WRITE | inotify_flags.MODIFY | inotify_flags.MOVED_TO | inotify_flags.CREATE
)
# While a terminal phase waits for the hooks' journal, look again this often.
_DRAIN_POLL = 0.02


class HostWatcher:
    """Follows this host's live sessions until each ends."""

    def __init__(
        self,
        server: TmuxServer,
        client: redis.Redis,
        timing: MonitorConfig,
        on_end: Callable[[SessionWatch, WatchEnd], None],
    ) -> None:
        self.server = server
        self.client = client
        self.timing = timing
        self.on_end = on_end
        self._incoming: queue.SimpleQueue[SessionWatch] = queue.SimpleQueue()
        self._watches: dict[str, SessionWatch] = {}
        self._by_wd: dict[int, SessionWatch] = {}
        # Run ids handed over and not yet ended (added from other threads).
        self._followed: set[str] = set()
        self._followed_lock = threading.Lock()
        self._stop = threading.Event()
        self._overflowed = False
        # Runs whose pane someone followed at the last sweep (`formulabeat logs`).
        self._pane_wanted: set[str] = set()
        self._inotify = INotify(nonblocking=True)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._loop, name="formulabeat-watcher", daemon=True)

    def start(self) -> None:
        """Start the watcher thread."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching (the sessions go on; a new worker adopts them)."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout)

    def add(self, watch: SessionWatch) -> bool:
        """Follow one more session (from any thread); False when it is followed already."""
        with self._followed_lock:
            if watch.run.id in self._followed:
                return False
            self._followed.add(watch.run.id)
        self._incoming.put(watch)
        self._wake()
        return True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        # Its thread id, for `top -H -p <worker>` and `make soak` (its CPU alone).
        log.info("watcher thread %d follows this host's sessions", threading.get_native_id())
        next_check = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, next_check - time.monotonic())
            if any(w.terminal is not None for w in self._watches.values()):
                timeout = min(timeout, _DRAIN_POLL)
            try:
                select.select([self._inotify.fileno(), self._wake_r], [], [], timeout)
                self._step()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.timing.liveness_interval
                    self._check_all()
            except Exception:
                # One bad round must not end the monitoring of every session.
                log.exception("watcher round failed")
                time.sleep(self.timing.poll_interval)
        self._inotify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _step(self) -> None:
        """Take in new sessions and inotify events; judge the sessions they touch."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        dirty: dict[str, SessionWatch] = {}
        while not self._incoming.empty():
            watch = self._incoming.get()
            try:
                wd = self._inotify.add_watch(str(watch.run_dir), _MASK)
            except OSError as exc:
                self._end(watch, MonitorExit("failed", f"cannot watch {watch.run_dir}: {exc}"))
                continue
            watch.wd = wd
            self._by_wd[wd] = watch
            self._watches[watch.run.id] = watch
            dirty[watch.run.id] = watch
        for event in self._inotify.read(timeout=0):
            if event.mask & inotify_flags.Q_OVERFLOW:
                self._overflowed = True
            touched = self._by_wd.get(event.wd)
            if touched is not None and event.name in WAKE_NAMES:
                dirty[touched.run.id] = touched
        pending = [w for w in self._watches.values() if w.terminal is not None]
        for watch in [*dirty.values(), *pending]:
            if watch.run.id not in self._watches:
                continue
            ended: WatchEnd | None = watch.scan()
            if ended is None and watch.exited():
                alive, how = watch.session.status()
                ended = None if alive else watch.check(alive, how, None)
            if ended is not None:
                self._end(watch, ended)

    def _check_all(self) -> None:
        """The fallback for what inotify cannot see, for every session at once."""
        if not self._watches:
            return
        try:
            panes = self.server.pane_states()
        except SessionError as exc:
            log.warning("liveness check skipped: %s", exc)
            return
        ids = list(self._watches)
        try:
            stops, wanted = registry.requests(self.client, ids)
        except redis.exceptions.RedisError:
            stops, wanted = {}, set()  # Redis away: sessions go on; leases say when to stop
        self._pane_wanted = wanted
        # Writes inotify could not report (its queue overflowed): read every
        # session's files. Else the events said it all, and the sweep reads none.
        missed, self._overflowed = self._overflowed, False
        for run_id in ids:
            watch = self._watches[run_id]
            ended: WatchEnd | None = watch.scan() if missed else None
            watch.count()
            if ended is None:
                state = panes.get(watch.session.pane_id) if panes is not None else None
                alive, how = watch.session.status_from(state, known=True, exit_file=missed)
                if alive and run_id in wanted:
                    self._publish_pane(watch)
                ended = watch.check(alive, how, stops.get(run_id))
            if ended is not None:
                self._end(watch, ended)

    def _publish_pane(self, watch: SessionWatch) -> None:
        with contextlib.suppress(SessionError, redis.exceptions.RedisError):
            registry.publish_pane(self.client, watch.run.id, watch.session.capture())

    def _end(self, watch: SessionWatch, ended: WatchEnd) -> None:
        try:
            watch.count(now=True)  # the tokens written since the last look
        except Exception:
            log.exception("run %s: counting its last tokens failed", watch.run.id)
        if watch.run.id in self._pane_wanted:
            # A follower's last sight of the screen, before the session is killed.
            self._publish_pane(watch)
        self._watches.pop(watch.run.id, None)
        with self._followed_lock:
            self._followed.discard(watch.run.id)
        if watch.wd is not None:
            self._by_wd.pop(watch.wd, None)
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(watch.wd)
        try:
            self.on_end(watch, ended)
        except Exception:
            log.exception("run %s: handling its end failed", watch.run.id)
