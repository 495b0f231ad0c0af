"""Small shared helpers: atomic writes, the console, progress bars, devices."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import DeviceError


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def remove_orphan_temps(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.<name>.<pid>.tmp[.<ext>]``) that atomic writes of a killed process
    left in ``folders`` (not recursive); files of a process still running are kept."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp*"):
            stem = p.name if p.name.endswith(".tmp") else p.name.rsplit(".", 1)[0]  # ".x.<pid>.tmp.gpkg" keeps its format's extension
            if not stem.endswith(".tmp"):
                continue
            pid = stem[: -len(".tmp")].rsplit(".", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


#: the width tables and text are laid out at when stdout is not a terminal (a pipe, a file, a
#: captured log): wide enough that no table column is cut or folded, so ``| cat`` / ``| grep`` see
#: every identifier (hashes, paths) whole, on one line
PIPE_WIDTH = 10_000


def console():
    """The console commands print to: stdout, at the terminal's width on a terminal and at
    :data:`PIPE_WIDTH` otherwise (rich's default there is 80 columns, which cut long columns)."""
    from rich.console import Console

    con = Console(stderr=False, highlight=False)
    if not con.is_terminal and not con.is_jupyter:
        con = Console(stderr=False, highlight=False, width=PIPE_WIDTH)
    return con


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True, transient: bool = False) -> Iterator:
    """A rich progress bar; yields ``advance(n=1, **fields)``. Disabled -> a no-op callable."""
    if not enabled:
        yield lambda n=1, **kw: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, transient=transient) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None, total: int | None = None) -> None:
            extra = {"info": info} if info is not None else {}
            if total is not None:
                extra["total"] = total
            prog.update(task, advance=n, **extra)

        yield advance


@contextlib.contextmanager
def counting_progress(description: str, *, enabled: bool = True, transient: bool = False) -> Iterator:
    """A progress bar driven by ``callback(done, total)`` calls (the library's progress hooks)."""
    with progress_bar(description, None, enabled=enabled, transient=transient) as adv:
        state = {"n": 0}

        def callback(done: int, total: int) -> None:
            adv(done - state["n"], total=total)
            state["n"] = done

        yield callback


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"train.device / --device {name!r}: CUDA is not available on this machine (use cpu or auto)")
    return dev
