"""A running job's lease: renewed by a heartbeat thread, checked together with the cancel flag.

If the worker dies, the heartbeat stops, the lease runs out and the reconciler hands the job to
another worker. If this worker merely froze long enough to lose its lease, it notices at the next
renewal and stops touching the job, which by then belongs to someone else.

While the database is unreachable neither check can be made: the job keeps running, the heartbeat
tries again at every beat (the lease has slack: QDPO_LEASE_SECONDS against QDPO_HEARTBEAT_SECONDS)
and the cancel poll backs off (each try may wait a connect timeout, in the training thread).
"""

from __future__ import annotations

import logging
import threading
import time

from service.crud import jobs as jobs_crud
from service.db import session_factory

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, database_url: str, job_pk: int, owner: str, lease_seconds: float, heartbeat_seconds: float, cancel_poll_seconds: float):
        self.sessions = session_factory(database_url)
        self.job_pk, self.owner = job_pk, owner
        self.lease_seconds, self.heartbeat_seconds, self.cancel_poll_seconds = lease_seconds, heartbeat_seconds, cancel_poll_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_pk}", daemon=True)
        self._cancel_requested = False
        self._next_poll = 0.0
        self._poll_failures = 0

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_seconds + 5)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                with self.sessions() as session:
                    if not jobs_crud.renew_lease(session, job_pk=self.job_pk, owner=self.owner, lease_seconds=self.lease_seconds):
                        log.warning("lost the lease of job %s; stopping it", self.job_pk)
                        self.lost.set()
                        return
            except Exception as exc:  # a database hiccup: try again at the next beat, the lease has slack
                log.warning(
                    "lease renewal of job %s failed (%s: %s); trying again at the next beat", self.job_pk, type(exc).__name__, str(exc).splitlines()[0][:200]
                )

    def should_stop(self) -> bool:
        """The pipeline's `should_cancel`: a cancel request, or the lease went to another worker."""
        if self.lost.is_set() or self._cancel_requested:
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.cancel_poll_seconds
            try:
                with self.sessions() as session:
                    requested, still_ours = jobs_crud.cancel_state(session, job_pk=self.job_pk, owner=self.owner)
            except Exception as exc:
                if self._poll_failures == 0:
                    log.warning("cancel poll failed (%s: %s); the job goes on and polls less often until the database answers", type(exc).__name__, exc)
                self._next_poll = time.monotonic() + min(30.0, self.cancel_poll_seconds * 2**self._poll_failures)
                self._poll_failures += 1
                return False
            self._poll_failures = 0
            self._cancel_requested = requested
            if not still_ours:
                self.lost.set()
        return self.lost.is_set() or self._cancel_requested
