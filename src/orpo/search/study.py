"""Where a sweep's trials live and who runs them: the Optuna study, its storage, and the clean-up of trials whose
process died.

Optuna's storage is the whole distributed engine: every process that opens the same study (the default journal
file in the sweep folder, a journal file on a shared disk, or a PostgreSQL/MySQL URL) pulls its own trials from
it. Optuna's journal file has no heartbeat, so a trial whose process was killed stays RUNNING for ever; each trial
here records its host, process id (with the process's start time, so a reused id is not taken for it) and a
heartbeat, and `reap` marks a RUNNING trial FAIL when its process is gone (same host) or its heartbeat is older
than `stale_after` (another host), then queues its settings again as a new trial that says whose rerun it is.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError

log = logging.getLogger(__name__)
DEFINITION = "orpo_sweep"  # study user attribute: what the sweep searches and how it scores (checked on resume)
HEARTBEAT_S = 60.0  # seconds between heartbeats (stale_after, default 10 min, is ten of them)


def open_storage(url: str | None, folder: Path):
    """The study's storage: `url` None is a journal file in the sweep folder; a plain path is a journal file (on a
    disk every worker mounts); anything with '://' an Optuna RDB URL (postgresql://, mysql://; sqlite:// only for
    one worker at a time). Raises ConfigError naming the URL when it cannot be opened."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    where = url or str(folder / "study.journal")
    try:
        if url is not None and "://" in url:
            if url.startswith("sqlite"):
                log.warning("%s: Optuna advises against SQLite for several workers; use a journal file or PostgreSQL/MySQL for parallel sweeps", url)
            return optuna.storages.RDBStorage(url)
        path = Path(where).expanduser()
        if not path.parent.is_dir():
            raise FileNotFoundError(f"no folder {path.parent}")
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as exc:  # a bad URL, a missing driver, a refused connection, a folder that is not there
        raise ConfigError(f"storage {where}: cannot open it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def check_definition(study, definition: dict[str, Any], storage_name: str) -> None:
    """Record what this sweep searches in the study, or, when the study has one, refuse a different one (a second
    worker or a resumed sweep must search the same space, on the same config, for the same objective)."""
    stored = study.user_attrs.get(DEFINITION)
    if stored is None:
        study.set_user_attr(DEFINITION, definition)
        return
    differing = sorted(k for k in set(stored) | set(definition) if stored.get(k) != definition.get(k))
    if differing:
        raise ConfigError(f"study {study.study_name!r} in {storage_name} was started by another sweep (its {', '.join(differing)} "
                          "differ): give the same config, space and objective to resume it, or another --study / --out")


def process_start(pid: int) -> str | None:
    """When process `pid` started (Linux /proc: clock ticks since boot), or None where that cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def claim(trial) -> None:
    """Mark `trial` as this process's: host, pid, the process's start time, a first heartbeat."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("pid_start", process_start(os.getpid()))
    trial.set_user_attr("heartbeat", time.time())


class Heartbeat:
    """A thread that tells the study every HEARTBEAT_S that this trial's process is alive, through loading,
    training and evaluation alike (`with Heartbeat(trial): ...`)."""

    def __init__(self, trial):
        self.trial, self.done = trial, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="orpo-sweep-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=10)

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # the trial finished meanwhile, or the storage is unreachable: nothing more to say
                return


def why_dead(trial, stale_after: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial's process is gone, or None while it may be alive."""
    now = time.time() if now is None else now
    attrs = trial.user_attrs
    if "pid" not in attrs:  # created, not yet claimed: judge by its age
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return f"never claimed by a process in {(now - started) / 60:.0f} min" if now - started > stale_after else None
    host, pid = attrs["host"], attrs["pid"]
    if host == socket.gethostname():
        if pid == os.getpid():
            return None
        alive = process_start(pid)
        if alive is None or (attrs.get("pid_start") is not None and alive != attrs["pid_start"]):
            return f"its process {pid} on {host} is gone"
        return None
    quiet = now - float(attrs.get("heartbeat", 0))
    return f"no heartbeat from {host} (process {pid}) for {quiet / 60:.0f} min" if quiet > stale_after else None


def reap(study, stale_after: float) -> list[str]:
    """Mark FAIL every RUNNING trial whose process is gone and queue its settings again as a new trial (user
    attribute rerun_of); returns a line per trial. A trial another worker finished or reaped meanwhile is skipped."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    lines = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = why_dead(trial, stale_after)
        if reason is None:
            continue
        try:  # the note first: a finished trial takes no attribute; the state change is the atomic claim
            study._storage.set_trial_user_attr(trial._trial_id, "note", f"failed: {reason} (found by a later sweep process); rerun as a new trial")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})
        lines.append(f"trial {trial.number}: {reason}; marked failed, its settings queued again")
    for line in lines:
        log.warning("%s", line)
    return lines
