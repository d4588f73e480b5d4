"""A training run's directory: its files, written so that no kill loses them, and its lock.

  config.json    the run's settings and the history of the settings changed on resumes
  metrics.jsonl  one record per finished epoch; after a clean stop (`stopping`), a last
                 line {"stopped": why, "step": N, ...} saying how far the run got
  summary.json   the final evaluation
  checkpoints/   orbax checkpoints (`checkpoint.Checkpointer`)
  run.lock       held by the process that trains; names it

Every file is replaced whole (written beside it, then renamed over it), so a reader, or a
run killed at any instant, sees either the old file or the new one, never a torn one.
A directory holding files this tool did not write is refused, never emptied.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

FORMAT = "noprop_jax run"  # config.json's marker: what tells our runs from other files
OWN = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "run.lock",
       "damaged-checkpoints")

class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says why and what to do."""


class ConfigMismatchError(WorkdirError):
  pass


class DiskFullError(WorkdirError):
  """The workdir's filesystem has no room for a checkpoint (`checkpoint.Checkpointer`)."""


# ----------------------------------------------------------------------------- writing files

def write_atomic(path: Path, text: str) -> None:
  """Replace `path` by `text` in one step: a kill leaves the old file or the new one."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
    fd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_json(path: Path, obj: Any) -> None:
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_records(path: Path, records: list[dict[str, Any]],
                  stop: dict[str, Any] | None = None) -> None:
  """metrics.jsonl: the epoch records, then (a run stopped on request) where it stopped."""
  write_atomic(path, "".join(json.dumps(r) + "\n" for r in records + ([stop] if stop else [])))


def remove_stale_temps(workdir: Path) -> None:
  """Delete what a run killed mid-write left beside its files (call holding the lock)."""
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    for tmp in workdir.glob(f".{name}.*.tmp"):
      tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the directory

def prepare(workdir: str | os.PathLike) -> Path:
  """The workdir, created if needed; a one-line error if it cannot be one."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory; give a directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    parent = next(p for p in workdir.parents if p.exists())
    raise WorkdirError(f"--workdir {workdir} cannot be created: {parent} is a file, not a "
                       "directory") from None
  except PermissionError:
    raise WorkdirError(f"--workdir {workdir} cannot be created: permission denied") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir} is not writable; give one you can write to")
  return workdir


@dataclasses.dataclass(frozen=True)
class Saved:
  """What a workdir holds from earlier runs."""

  config: dict[str, Any] | None  # the settings of the last start; None for a new workdir
  history: list[dict[str, Any]]  # settings changed on resumes: {"step", "time", "changed"}
  records: list[dict[str, Any]]  # metrics.jsonl's epoch records
  stop: dict[str, Any] | None = None  # its last line, if the run stopped on request


def read_config(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(config, history) of a run's config.json; a WorkdirError if it is not one of ours."""
  try:
    d = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path} is damaged ({e}); it is not a config.json this tool wrote "
                       "(it replaces it whole). Use another --workdir") from None
  if isinstance(d, dict) and d.get("format") == FORMAT:
    return d["config"], d.get("history", [])
  if isinstance(d, dict) and {"method", "model", "train"} <= set(d):  # before the marker (0.2)
    return d, []
  raise WorkdirError(f"{path} is not a noprop_jax run's config.json; this workdir holds "
                     "something else: use another --workdir")


def read_records(path: Path) -> list[dict[str, Any]]:
  """metrics.jsonl's epoch records, checked: epochs 1, 2, ... each once, with their step
  (a stopped run's last line, saying where it stopped, is not one: `read_stop`)."""
  return _read(path)[0]


def read_stop(path: Path) -> dict[str, Any] | None:
  """Where a run that stopped on request stopped (metrics.jsonl's last line), or None
  if it did not (or has been resumed since)."""
  return _read(path)[1]


def _read(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
  if not path.exists():
    return [], None
  records, stop = [], None
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      raise WorkdirError(f"{path}, line {n}: not JSON ({e}); this tool replaces the file "
                         "whole, so something else changed it: repair or delete that line") from None
    if stop is not None:
      raise WorkdirError(f"{path}, line {n}: a record after the line saying where the run "
                         "stopped; this file was changed by something else: repair it or use "
                         "another --workdir")
    if isinstance(r, dict) and "stopped" in r and isinstance(r.get("step"), int):
      stop = r
      continue
    want = len(records) + 1
    if not (isinstance(r, dict) and r.get("epoch") == want and isinstance(r.get("step"), int)):
      raise WorkdirError(f"{path}, line {n}: expected the record of epoch {want} (with its "
                         f"'epoch' and 'step'), got {line[:80]!r}; this file was not written "
                         "by this tool or was changed: repair it or use another --workdir")
    records.append(r)
  return records, stop


def read(workdir: Path) -> Saved:
  """The workdir's config, history and metrics; refuses a directory this tool did not fill."""
  path = workdir / "config.json"
  if not path.exists():
    foreign = sorted(p.name for p in workdir.iterdir()
                     if not (p.name in ("run.lock", "checkpoints") or p.name.endswith(".tmp"))
                     or (p.name == "checkpoints" and any(p.iterdir())))
    if foreign:
      raise WorkdirError(f"--workdir {workdir} is not empty ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}) but holds no noprop_jax run "
                         "(no config.json): use an empty or new directory")
    return Saved(None, [], [])
  config, history = read_config(path)
  return Saved(config, history, *_read(workdir / "metrics.jsonl"))


def _flat(config: dict[str, Any]) -> dict[str, Any]:
  """{'train': {'lr': ...}, 'method': 'dt'} -> {'lr': ..., 'method': 'dt'} (names are unique)."""
  return {k2: v2 for k, v in config.items()
          for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}


def config_changes(workdir: Path, saved: dict[str, Any], now: dict[str, Any],
                   resumable: tuple[str, ...]) -> dict[str, list]:
  """{setting: [saved, now]} of the settings a resume changes; a ConfigMismatchError
  if any of them is not `resumable` (the run's `RunConfig.resumable`)."""
  saved, now = _flat(saved), _flat(now)
  diff = {k: [saved.get(k), v] for k, v in now.items() if saved.get(k) != v}
  diff.update({k: [v, None] for k, v in saved.items() if k not in now})
  fixed = {k: d for k, d in diff.items() if k not in resumable}
  if fixed:
    lines = "\n".join(f"  {k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(fixed.items()))
    raise ConfigMismatchError(
        f"{workdir} holds a run with a different config:\n{lines}\n"
        f"Use another --workdir, or rerun with the saved settings to resume "
        f"(only {', '.join(resumable)} may change).")
  return diff


def record_start(workdir: Path, saved: Saved, config: dict[str, Any], step: int,
                 resumable: tuple[str, ...]) -> None:
  """Write config.json for a run that has started (at `step`): the settings, and in the
  history the ones this start changed. Untouched when nothing changed."""
  changed = (config_changes(workdir, saved.config, config, resumable)
             if saved.config is not None else None)
  if changed == {}:
    return
  history = saved.history + ([{"step": step, "time": now(), "changed": changed}]
                             if changed else [])
  from noprop_jax import __version__  # the package's, once it has loaded

  write_json(workdir / "config.json", {"format": FORMAT, "version": __version__,
                                       "config": config, "history": history})


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the lock

@contextlib.contextmanager
def lock(workdir: Path, print_fn: Callable[[str], None] = print) -> Iterator[None]:
  """Hold workdir/run.lock while training: a second run on the same workdir is refused
  at once, naming the holder.

  The lock is the operating system's (`flock`), which is released when its process dies,
  however it dies: a lock file left by a killed run holds its holder's description but no
  lock, and the next run takes it over. (Shared filesystems: NFS v4 honours `flock`
  across hosts; some FUSE mounts do not.)
  """
  try:
    import fcntl
  except ImportError:  # not POSIX: run without a lock rather than not at all
    yield
    return
  path = workdir / "run.lock"
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirError(f"--workdir {workdir} is in use by another run ({_holder(fd)}); wait "
                         "for it to finish, or use another --workdir") from None
    left = os.pread(fd, 4096, 0)
    if left.strip():
      print_fn(f"taking over {path} from a run that is no longer running ({_holder(fd)})")
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode() + b"\n", 0)
    os.fsync(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # an empty lock file: the run ended (however it failed, if it did)
  finally:
    os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
  try:
    h = json.loads(os.pread(fd, 4096, 0))
    return f"pid {h['pid']} on {h['host']}, started {h['started']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"
