# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The life cycle of a probe in the check: its shape, its load errors, one per process (claims), and the
slot that loads it, retries with a back-off, and closes it."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from datadog_checks.base import AgentCheck

# Backoff between load attempts: 15 s, 30 s, 60 s, ... up to the slot's maximum.
FIRST_RETRY_INTERVAL = 15.0


class ProbeLoadError(RuntimeError):
    """A probe could not be loaded; the message says why and what to do."""


class ProbeNotGranted(ProbeLoadError):
    """The host does not grant an optional probe what it needs (a capability): a choice of the
    install, not a fault. Its service check is a WARNING saying what to grant or to set."""


class Probe(Protocol):
    """A loaded probe: made by its feature's factory, read each run, released by close()."""

    @property
    def variant(self) -> str: ...  # how it was loaded: 'co-re' or 'bcc'

    @property
    def hooks(self) -> Sequence[str]: ...  # what it attached or uses

    @property
    def rejected_hooks(self) -> Mapping[str, str]: ...  # hook -> why it is not used here

    @property
    def limitations(self) -> Sequence[str]: ...  # what works in a degraded way (or as a fallback), said once each

    def close(self) -> None: ...


P = TypeVar('P', bound=Probe)


class _Claims:
    """One probe of each feature per process: two would report every OOM kill twice.

    The Agent runs every instance of a check in one Python process; a claim is held by the
    check instance that loaded the probe, and lapses when that instance closes it or is gone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[str, weakref.ref] = {}

    def take(self, feature: str, holder: object) -> bool:
        with self._lock:
            current = self._holders.get(feature)
            if current is not None and current() not in (None, holder):
                return False
            self._holders[feature] = weakref.ref(holder)
            return True

    def release(self, feature: str, holder: object) -> None:
        with self._lock:
            current = self._holders.get(feature)
            if current is not None and current() in (None, holder):
                del self._holders[feature]


CLAIMS = _Claims()


class ProbeSlot(Generic[P]):
    """One probe in the check: loaded on first use, retried with backoff when it cannot load.

    The error of a failed load is kept, reported on every run, and logged once per distinct
    message (no traceback): a host without the needed privileges is a state, not an accident.
    """

    def __init__(self, name: str, option: str, loader: Callable[[], P], max_interval: float, check: AgentCheck):
        self.name = name
        self._option = option  # the instance option that turns this feature on
        self._loader = loader
        self._max_interval = max_interval
        self._check = check
        self.probe: P | None = None
        self.error: str | None = None
        self.not_granted = False  # the error is a ProbeNotGranted: a WARNING, not a CRITICAL
        self._failures = 0
        self._run_failures = 0  # runs in a row the loaded probe failed in
        self._next_attempt = 0.0
        self._logged_error: str | None = None
        self._limitations_said = 0
        self.claim_refused = False  # another instance in this process holds this probe

    def get(self) -> P | None:
        """The loaded probe, loading it if due; None while it cannot load (see .error)."""
        if self.probe is not None:
            return self.probe
        now = time.monotonic()
        if now < self._next_attempt:
            return None
        self.claim_refused = not CLAIMS.take(self.name, self._check)
        if self.claim_refused:
            self._failed(
                f'another instance of this check in this process already runs the {self.name} probe; two would '
                f'report everything twice: set `{self._option}: false` in every instance but one',
                now,
            )
            return None
        try:
            self.probe = self._loader()
        except ProbeLoadError as e:
            CLAIMS.release(self.name, self._check)
            self._failed(str(e), now)
            self.not_granted = isinstance(e, ProbeNotGranted)
            return None
        except Exception as e:  # an unexpected failure must not stop the other probe or later runs
            CLAIMS.release(self.name, self._check)
            self._check.log.debug('Loading the %s probe failed', self.name, exc_info=True)
            self._failed(f'unexpected error: {type(e).__name__}: {e}', now)
            return None
        self._loaded(self.probe)
        return self.probe

    def _loaded(self, probe: P) -> None:
        self._failures = 0
        self._next_attempt = 0.0
        self.error = None
        self.not_granted = False
        self._logged_error = None
        log = self._check.log
        log.info('Loaded the %s probe (%s) with %s', self.name, probe.variant, ', '.join(probe.hooks))
        for hook, reason in probe.rejected_hooks.items():
            log.info('%s probe: not using %s: %s', self.name, hook, reason)
        self._limitations_said = 0
        self.warn_of_new_limitations()

    def run_succeeded(self) -> None:
        """After a good run: say what the probe newly found it cannot do; a later failure is logged again."""
        self._logged_error = None
        self._run_failures = 0
        self.warn_of_new_limitations()

    def warn_of_new_limitations(self) -> None:
        """Warn once of each limitation the probe found (at load, or since, while running)."""
        if self.probe is None:
            return
        for limitation in self.probe.limitations[self._limitations_said :]:
            self._check.warning('The %s probe runs with a limitation: %s', self.name, limitation)
        self._limitations_said = len(self.probe.limitations)

    def run_failed(self, error: Exception) -> str:
        """A loaded probe failed during a run: it is closed and loaded again, at the next run the first
        time, then with the back-off of failed loads while runs keep failing. Returns the message for
        its service check; logged once while it lasts."""
        self._run_failures += 1
        interval = 0.0
        if self._run_failures > 1:
            interval = min(FIRST_RETRY_INTERVAL * 2 ** (self._run_failures - 2), self._max_interval)
        message = f'collecting failed: {error}; the probe is loaded again ' + (
            f'in {interval:.0f}s' if interval else 'at the next run'
        )
        if message != self._logged_error:
            self._check.log.warning('The %s probe failed during a run: %s', self.name, message)
            self._check.log.debug('The %s probe failed during a run', self.name, exc_info=True)
            self._logged_error = message
        self.close()
        self.error = message
        self._next_attempt = time.monotonic() + interval
        return message

    def _failed(self, message: str, now: float) -> None:
        self.error = message
        self.not_granted = False
        self._failures += 1
        interval = min(FIRST_RETRY_INTERVAL * 2 ** (self._failures - 1), self._max_interval)
        self._next_attempt = now + interval
        if message != self._logged_error:
            self._check.warning('Cannot load the %s probe: %s (retrying in %ds)', self.name, message, interval)
            self._logged_error = message
        else:
            self._check.log.debug('Still cannot load the %s probe: %s', self.name, message)

    def close(self) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.close()
            CLAIMS.release(self.name, self._check)
