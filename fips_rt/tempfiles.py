"""Hidden temporaries beside a final output (``.NAME.tmp-PID``, ``.NAME.build-PID-XXXX``).

Outputs are written under a temporary name in the output's folder (same file system, so the final
``os.replace`` is atomic). A run killed with SIGKILL cannot remove its temporary; the next run that
writes the same output removes every temporary of that output whose process is gone.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def temp_path(final: Path, tag: str = "tmp") -> Path:
    return Path(final).parent / f".{Path(final).name}.{tag}-{os.getpid()}"


def temp_prefix(final: Path, tag: str = "build") -> str:
    """A prefix for tempfile.mkdtemp / TemporaryDirectory that carries this process id."""
    return f".{Path(final).name}.{tag}-{os.getpid()}-"


def owner_pid(entry_name: str, final_name: str) -> int | None:
    """The process id in a temporary's name of ``final_name``'s output, or None if it is not one."""
    m = re.fullmatch(rf"\.{re.escape(final_name)}\.(?:tmp|build)-(\d{{1,10}})(?:-.*)?", entry_name)
    return int(m.group(1)) if m else None


def stale_temporaries(final: Path) -> list[Path]:
    final = Path(final)
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        pid = owner_pid(entry.name, final.name)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            out.append(entry)
    return sorted(out)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove the temporaries of ``final`` left by dead processes; returns what was removed."""
    removed = []
    for entry in stale_temporaries(final):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed
