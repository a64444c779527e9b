"""What the driver checks before a study starts: a Ray cluster that answers, one driver per
study, and on resume a study unchanged since it started (README, "Reliability")."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nem_study import contract, tracking
from nem_study.config import InputError
from nem_study.experiments import safe_name, storage_path
from nem_study.study_config import StudyConfig


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the address, when no Ray cluster answers at ``HOST:PORT``.

    Ray itself waits and retries for minutes before it gives up on an address.
    """
    if not address or address == "auto":
        return  # a local Ray, or the cluster this node belongs to (ray.init finds it or says so)
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise InputError(f"--address {address}: no Ray cluster answers there ({type(e).__name__}: {e}). "
                         "Start one (ray start --head) or fix the address (HOST:PORT, or auto).") from None


@contextmanager
def driver_lock(study: StudyConfig) -> Iterator[None]:
    """One driver per study at a time: two would open two parent runs and share Tune's folder.

    An ``flock`` on ``.<name>.lock`` in the local storage folder (with URI storage, in the data
    cache): the kernel releases it when the driver exits, however it exits.
    """
    from nem_study import data

    storage = storage_path(study)
    folder = data.data_dir() / "locks" if contract.has_scheme(storage) else Path(storage)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / f".{safe_name(study.name)}.lock", "a+")
    except OSError as e:
        raise InputError(f"storage {storage}: cannot write there ({e.strerror or e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(f"study {study.name!r} is running already ({holder}), with its trials in {storage}. "
                             "Wait for it to end, or stop it (Ctrl-C) and continue it with `nem-study resume`.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def edits(before: Any, after: Any, key: str = "") -> list[str]:
    """``["grid.model.k: [2, 3] -> [2, 4]", ...]``: the values that differ between two resolved
    studies. Keys only one side has (a field added or dropped by another nem-study version) are
    not edits."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for k in before if k in after
                for change in edits(before[k], after[k], f"{key}.{k}" if key else str(k))]
    return [] if before == after else [f"{key}: {json.dumps(before)} -> {json.dumps(after)}"]


def check_unchanged(study: StudyConfig, uri: str, parent_run_id: str) -> None:
    """Resume runs a study as it started: Tune's saved trials are indices into the trial list of
    the study as started, so an edited grid, base or seed count would give them other configs."""
    started = tracking.study_as_started(uri, parent_run_id)
    if started is None:
        return  # a parent run without its resolved study (made by hand): nothing to compare
    changed = edits(started, study.model_dump(mode="json"))
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise InputError(f"study {study.name!r} changed since it started: {shown}. Resume runs the study as it "
                         f"started (MLflow parent run {parent_run_id}, artifact study_resolved.yaml): undo the edit "
                         "(and pass the same --set), or run the edited study under a new name.")
