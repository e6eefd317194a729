"""One pipeline run at a time per working copy: an exclusive lock on a file in the project root.

Two runs in the same folder would interleave their writes to the labels, the checkpoint and the
registry. The Prefect flow and every ``d2llm`` pipeline step take this lock first; a second run
refuses at once with the holder's process id, or waits up to ``wait`` seconds for it to finish.
The lock is ``flock`` on ``.d2llm.lock`` (POSIX): the kernel releases it when the holding process
ends, however it ends, so a killed run never leaves a stale lock behind.

``folder_lock`` is the same kind of lock on one folder that a command writes outside the
pipeline's artefacts (a search index): two ``d2llm index`` runs into one folder would write the
same vector files.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from d2llm.errors import PipelineLockedError

LOCK_FILE = ".d2llm.lock"
# Set (to 1) in the environment of a step run on behalf of a process that holds the lock and
# waits for it: a labelling Ray job (d2llm.labelling.ray_job), the torchrun workers of a training
# step (d2llm.distributed.launch_torchrun). The CLI then does not take it again.
LOCK_HELD_ENV = "D2LLM_LOCK_HELD_BY_PARENT"
_POLL_SECONDS = 0.2


@contextmanager
def pipeline_lock(root: str | Path = ".", wait: float = 0.0) -> Iterator[Path]:
    """Hold the working copy's pipeline lock for the ``with`` block; yields the lock file's path.

    Raises PipelineLockedError when another process holds it for longer than ``wait`` seconds.
    """
    import fcntl

    path = Path(root) / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole block
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = path.read_text(encoding="utf-8").strip() or "another process"
                    waited = f" after waiting {wait:g} s" if wait > 0 else ""
                    raise PipelineLockedError(
                        f"another d2llm pipeline run is using this working copy ({holder}; lock "
                        f"{path.resolve()}){waited}: wait for it to finish, or run with a wait "
                        "(d2llm --wait SECONDS, or the flow's lock_wait) to queue behind it"
                    ) from None
                time.sleep(_POLL_SECONDS)
        handle.seek(0)
        handle.truncate()
        since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


@contextmanager
def folder_lock(folder: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself for the ``with`` block (``flock`` on the
    directory: nothing is added to it). Raises PipelineLockedError(``busy``) at once when
    another process holds it."""
    import fcntl

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineLockedError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
