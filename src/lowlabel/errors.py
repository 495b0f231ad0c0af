"""The failures a user can cause and fix: bad data, a bad artefact, a bad config, a run that
exists, a diverging run, a missing device. The CLI prints each as one line naming the file or
key and the problem, and exits with status 2; anything else is a bug and keeps its traceback.

Every class also derives from the built-in error it refines (``ValueError``, ``FileExistsError``,
...) so code that catches those keeps working, and every one survives pickling (DataLoader
workers send errors to the main process by pickling them).
"""

from __future__ import annotations

import os


class LowlabelError(Exception):
    """An expected failure, fixable by the user; ``str(err)`` is the whole message."""


class PathError(LowlabelError):
    """A failure tied to one file: the message is ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None):
        if problem is None:  # rebuilt from one message: PyTorch re-raises a DataLoader worker's error so
            path, problem = None, _last_line(str(path), type(self).__name__)
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # the default rebuilds from args = (message,), which lacks ``problem``
        return (type(self), (self.path, self.problem))


class DatasetError(PathError, ValueError):
    """Bad input data. The message names the file and the problem."""


class CheckpointError(PathError, ValueError):
    """A file given as a checkpoint that is not a readable lowlabel checkpoint."""


class ConfigError(LowlabelError, ValueError):
    """A config value (named by its key) that cannot be used."""


class RunExistsError(LowlabelError, FileExistsError):
    """``fit`` into a run directory that already holds a run."""


class DivergenceError(LowlabelError, FloatingPointError):
    """The loss became NaN or infinite."""


class DeviceError(LowlabelError, RuntimeError):
    """The requested device is not available on this machine."""


class ExportError(PathError, ValueError):
    """A model that cannot be exported (its architecture, the format), or an exported file that
    cannot be run (its metadata missing, unreadable or not its own)."""


def _last_line(message: str, name: str) -> str:
    """The error's own line out of a re-raised worker message ("Caught X in DataLoader worker
    process 0. Original Traceback ... lowlabel.errors.X: <path>: <problem>")."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        for prefix in (f"lowlabel.errors.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
    return message
