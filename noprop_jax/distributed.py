"""Multi-host runs: joining the other processes, and stopping when one of them is lost.

  from noprop_jax import distributed
  distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # first thing
  distributed.watch("runs/mine")   # optional: name its checkpoints when a process is lost

`initialize` wraps `jax.distributed.initialize`. The coordinator's address, the number of
processes and this process's id come from its arguments, else from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, else from JAX's cluster detection (SLURM, Open MPI,
TPU VM...); what none of them gives, or gives wrong, is a `DistributedError` of one line
saying how to give it. A coordinator on a loopback address (127.0.0.1:PORT) binds that
address, not JAX's default [::] (IPv6 may be off); JAX_COORDINATOR_BIND_ADDRESS overrides.

A lost process. By default JAX's runtime ends every process with a C++ stack trace when
one dies, naming nobody. `initialize` turns on JAX's recoverability instead, so that the
others survive the loss, and watches the processes two ways:
  - a lifeline: every process keeps a TCP connection open to process 0 (a port of its
    own, on the coordinator's host, published through the coordination service). A
    process that dies (killed, crashed, exited) closes it at once; process 0 tells the
    others, and they stop then (tests/test_multihost_cli.py bounds it at 30 s from a
    kill -9). TCP keepalive probes close it about
    `heartbeat_timeout` seconds after a host goes silent.
  - the coordination service's heartbeats: a process that stops sending them (frozen, or
    its host lost from the network) counts as dead after `heartbeat_timeout` seconds
    (default 60), as do processes that never reached the lifeline.
Then the survivors print one line to stderr (which process, and the last checkpoint that
all processes finished, in `watch`'s workdir) and exit at once with EXIT_LOST (69,
EX_UNAVAILABLE): a normal exit could wait minutes for the dead peer. Meanwhile their
collectives fail (gloo: an error, which `guard` turns into the same line) or hang (NCCL),
until the watchdog ends them. Process 0 exits last, a moment after telling the others.

Limitation: process 0 hosts the coordination service. When it is lost, JAX's C++ runtime
ends the others at once (it logs "Terminating process because the JAX distributed service
detected fatal errors" and aborts); nothing in Python can stop that (jaxlib cannot hand
the status to a Python callback). Their lifelines close at the same moment, and on one
machine they won the race in each of about ten tries: the C++ error lines, then the line
naming process 0, and EXIT_LOST. Either way, rerunning all processes resumes from the
last checkpoint they all finished, as after any other loss.

Leaving. With recoverability on, JAX no longer holds the processes together at exit, and
a process still disconnecting when process 0's service stops is ended by the runtime.
So at exit (atexit, before JAX's own shutdown) every process waits for the others at a
barrier, then marks itself as leaving (the others must not take it for lost) and
disconnects, and process 0 waits for them to be gone before stopping the service. A
process whose `guard`ed function raised waits FAILED_WAIT_SECONDS at most (else
LEAVE_WAIT_SECONDS): failing alone, it leaves, and the others report it lost.
"""

import atexit
import contextlib
import functools
import os
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

from noprop_jax import stopping

EXIT_LOST = 69  # the exit status after another process was lost (EX_UNAVAILABLE)
POLL_SECONDS = 1.0  # how often the heartbeat watch asks which processes are alive
TELL_SECONDS = 3.0  # how long process 0, stopping, waits for the others to go first
LEAVE_WAIT_SECONDS = 300  # at exit, how long a process waits for the others to finish too
FAILED_WAIT_SECONDS = 10  # ... one whose guarded function failed (the others may go on)
GONE_WAIT_SECONDS = 10  # at exit, how long process 0 waits for the others to disconnect

_LEFT = "noprop_jax.distributed/left/"  # key-value store: the processes leaving on purpose
_LIFELINE = "noprop_jax.distributed/lifeline"  # key-value store: process 0's lifeline port
_CLUSTERS = "SLURM, Open MPI or TPU VM"
_GIVE = {  # what each setting is, its flag on experiments/train.py, its environment variable
    "coordinator_address": ("the coordinator's address", "--coordinator-address HOST:PORT",
                            "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("the number of processes", "--num-processes N", "JAX_NUM_PROCESSES"),
    "process_id": ("this process's id", "--process-id I", "JAX_PROCESS_ID"),
}


class DistributedError(ValueError):
  """The processes cannot be joined as given: one line saying what is wrong and what to do."""


class _State:
  def __init__(self):
    self.client = None  # jax's DistributedRuntimeClient, once initialized here
    self.process_id, self.num_processes = 0, 1
    self.host = ""  # the coordinator's host
    self.workdir: Path | None = None
    self.watching = False  # whether a missing process is a lost one (not one leaving at the end)
    self.failed = False  # whether a guarded function raised
    self.lost: set[int] = set()
    self.exiting = False
    self.peers: dict[int, socket.socket] = {}  # process 0: the others' lifelines, by id
    self.left: set[int] = set()  # process 0: the others that said they leave
    self.line: socket.socket | None = None  # another process: its lifeline to process 0


_state = _State()
_lock = threading.Lock()  # _state's sets and flags, between the watching threads and main
_exiting = threading.Lock()  # one line, from one thread: never released


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 60,
               local_device_ids=None, initialization_timeout: int = 300,
               watchdog: bool = True) -> None:
  """Joins this process to the others (`jax.distributed.initialize`), before anything
  touches a JAX backend. See the module's docstring for where the settings come from and
  what happens when a process is lost; `watchdog=False` keeps JAX's own behaviour for that.
  Raises DistributedError when the settings are missing, malformed or inconsistent."""
  import jax

  given = _settings(coordinator_address, num_processes, process_id)
  address, n, pid = _detect(given, initialization_timeout)
  if None not in (n, pid) and not 0 <= pid < n:
    raise DistributedError(f"process id {pid} is out of range for {n} processes: give each "
                           f"process an id from 0 to {n - 1} (--process-id or JAX_PROCESS_ID)")
  missing = [k for k, v in zip(_GIVE, (address, n, pid)) if v is None]
  if missing:
    raise DistributedError(_missing_message(missing))
  if watchdog:  # before initialize: the service and client are made recoverable then
    jax.config.update("jax_enable_recoverability", True)
  try:
    jax.distributed.initialize(address, n, pid, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout,
                               coordinator_bind_address=_bind_address(address))
  except jax.errors.JaxRuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(
        f"process {pid} of {n} could not join the others through the coordinator at {address} "
        f"({first}): run the same command on every host, with the same address and a port "
        "that is free on process 0's host") from None
  if watchdog and n > 1:
    _start_watching(address, n, pid, heartbeat_timeout, initialization_timeout)


def watch(workdir) -> None:
  """The run's workdir: the line about a lost process names its last finished checkpoint."""
  _state.workdir = Path(workdir)


def guard(fn):
  """`fn` (a training function), ending the process with the one line and EXIT_LOST when
  it raises because another process was lost (a failed collective) rather than with its
  error. When it raises otherwise, this process waits less for the others at exit."""

  @functools.wraps(fn)
  def guarded(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except stopping.Stopped:  # a clean stop, agreed by all processes: no failure
      raise
    except BaseException as e:
      # A failed collective may come before the watch names the lost process; an
      # interrupt (not an Exception) is no such failure, and must not wait.
      wait = 3.0 if isinstance(e, Exception) else 0.0
      lost = lost_processes(wait) if _state.watching else []
      if lost:
        exit_lost(lost)
      _state.failed = True
      raise

  return guarded


def lost_processes(wait: float = 3.0) -> list[int]:
  """The ids of the processes that were lost ([] if none is known to be within `wait` s)."""
  deadline = time.monotonic() + wait
  while _state.watching:
    with _lock:
      lost = sorted(_state.lost)
    if lost or time.monotonic() >= deadline:
      return lost
    time.sleep(0.1)
  return []


def exit_lost(lost) -> None:
  """Prints the one line about the lost process(es) `lost` (an id or ids) and exits at once
  with EXIT_LOST: a normal exit would wait at jax.distributed's shutdown for them. Process
  0 tells the others first and lets them go before it (its service must outlive them)."""
  lost = [lost] if isinstance(lost, int) else sorted(lost)
  _exiting.acquire()  # never released: the other thread's line would be the same
  if _state.process_id == 0:
    _tell_others(lost)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed or broken stream: the line matters more
      pass
  try:
    print(lost_message(lost), file=sys.stderr, flush=True)
  finally:
    os._exit(EXIT_LOST)


def lost_message(lost: list[int]) -> str:
  who = (f"process {lost[0]} of {_state.num_processes} was" if len(lost) == 1 else
         f"processes {', '.join(map(str, lost))} of {_state.num_processes} were")
  return (f"error: {who} lost (it stopped or its host went away); stopping this process too. "
          + _resume_hint(_state.workdir))


def last_checkpoint(workdir) -> int | None:
  """The last checkpoint step that every process finished: orbax names a checkpoint's
  directory by its step once all have written it (`*.orbax-checkpoint-tmp*` until then)."""
  try:
    steps = [int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
             if p.name.isdigit() and p.is_dir()]
  except OSError:  # no checkpoints/ yet, or the shared filesystem went too
    return None
  return max(steps, default=None)


def _resume_hint(workdir: Path | None) -> str:
  if workdir is None:
    return "Rerun the same command on every host to resume from the last checkpoint."
  step = last_checkpoint(workdir)
  if step is None:
    return (f"No checkpoint was finished in {workdir / 'checkpoints'}: rerun the same command "
            "on every host to start again.")
  return (f"The last checkpoint all processes finished is step {step} in "
          f"{workdir / 'checkpoints'}: rerun the same command on every host to resume from it.")


def _settings(address, n, pid) -> dict:
  """The given settings, else their environment variables', checked and converted."""
  out = {}
  for key, value in zip(_GIVE, (address, n, pid)):
    what, flag, env = _GIVE[key]
    source = flag.split()[0]
    if value is None and os.environ.get(env, "").strip():
      value, source = os.environ[env].strip(), env
    if value is not None and key != "coordinator_address":
      try:
        value = int(value)
      except (TypeError, ValueError):
        raise DistributedError(f"{source} is {value!r}, not a whole number: give "
                               f"{what} as {flag}") from None
      if value < (1 if key == "num_processes" else 0):
        raise DistributedError(f"{source} is {value}: {what} must be "
                               f"{'at least 1' if key == 'num_processes' else '0 or more'}")
    if key == "coordinator_address" and value is not None:
      _check_address(str(value), source)
    out[key] = value
  return out


def _check_address(address: str, source: str) -> None:
  host, _, port = address.rpartition(":")
  if not (host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
    raise DistributedError(f"{source} is {address!r}, not HOST:PORT: give the coordinator's "
                           "address and a free port, e.g. 10.0.0.1:1234 (process 0 runs there)")


def _detect(given: dict, timeout: int) -> tuple:
  """The settings with JAX's cluster detection filling in what was not given."""
  address, n, pid = given.values()
  if None not in (address, n, pid):
    return address, n, pid
  try:
    from jax._src.clusters import ClusterEnv

    address, n, pid, _ = ClusterEnv.auto_detect_unset_distributed_params(
        address, n, pid, None, None, timeout)
  except (ImportError, AttributeError, TypeError):  # another JAX: its initialize detects, or
    pass  # says what is missing
  return address, n, pid


def _missing_message(missing: list[str]) -> str:
  whats, flags, envs = zip(*(_GIVE[k] for k in missing))
  what = " and ".join([", ".join(whats[:-1]), whats[-1]] if len(whats) > 1 else whats)
  return (f"{what} {'is' if len(missing) == 1 else 'are'} not known (no "
          f"{_CLUSTERS} cluster was detected to read {'it' if len(missing) == 1 else 'them'} "
          f"from): give {' '.join(flags)} (ids 0 to N-1, 0 on the coordinator's host), or "
          f"set {', '.join(envs)}")


def _bind_address(address: str) -> str | None:
  """Where process 0's coordinator listens: a loopback address itself (JAX's default [::]
  fails where IPv6 is off), else JAX's default or JAX_COORDINATOR_BIND_ADDRESS (None)."""
  host = address.rpartition(":")[0].strip("[]")
  return address if _loopback(host) and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") else None


def _loopback(host: str) -> bool:
  return host in ("localhost", "::1") or host.startswith("127.")


def _start_watching(address: str, n: int, pid: int, heartbeat: int, timeout: int) -> None:
  from jax._src import distributed as jax_distributed

  _state.client = jax_distributed.global_state.client
  _state.num_processes, _state.process_id = n, pid
  _state.host = address.rpartition(":")[0].strip("[]")
  _state.watching = True
  if pid == 0:
    _open_lifeline(heartbeat)
  else:
    _join_lifeline(heartbeat, timeout)
  threading.Thread(target=_heartbeats, name="noprop_jax.distributed heartbeats",
                   daemon=True).start()
  atexit.register(_leave)  # registered after JAX's own shutdown, so it runs before it


def _lose(lost) -> None:
  """Called by a watching thread: ends the process from a thread of its own (this one must
  go on reading the lifelines while process 0 lets the others go first)."""
  with _lock:
    if not _state.watching or _state.exiting:
      return
    _state.lost.update(lost)
    _state.exiting = True
    lost = sorted(_state.lost)
  threading.Thread(target=exit_lost, args=(lost,), daemon=True).start()


def _keepalive(sock: socket.socket, heartbeat: int) -> None:
  """A silent host (no answer to probes) closes the connection after about `heartbeat` s."""
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
  idle = max(1, heartbeat // 3)
  for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 2)),
                      ("TCP_KEEPCNT", 4)):
    if hasattr(socket, name):  # Linux; elsewhere the system's (slower) defaults
      sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _open_lifeline(heartbeat: int) -> None:
  """Process 0: a port for the others' lifelines, published in the key-value store."""
  # Where the coordinator listens (all interfaces unless loopback or told otherwise).
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "").rpartition(":")[0].strip("[]")
  host = bind or (_state.host if _loopback(_state.host) else "")
  try:
    server = _server(host)
    _state.client.key_value_set(_LIFELINE, str(server.getsockname()[1]))
  except Exception as e:  # the others' lifelines then fail too, and they warn
    _warn_no_lifeline(f"on {host or 'all interfaces'}", e, heartbeat)
    with contextlib.suppress(Exception):  # so that they do not wait for a port
      _state.client.key_value_set(_LIFELINE, "none")
    return
  threading.Thread(target=_serve, args=(server, heartbeat), name="noprop_jax.distributed lifelines",
                   daemon=True).start()


def _server(host: str) -> socket.socket:
  """A listening socket on `host` ("": every interface, IPv6 too where it is on)."""
  if host in ("", "::", "0.0.0.0"):
    if host != "0.0.0.0" and socket.has_dualstack_ipv6():
      try:
        return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
      except OSError:  # IPv6 is off
        pass
    return socket.create_server(("", 0))
  return socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


def _warn_no_lifeline(where: str, e: Exception, heartbeat: int) -> None:
  print(f"warning: no lifeline {where} ({type(e).__name__}: {e}); a lost process is noticed "
        f"only after the heartbeat timeout ({heartbeat} s)", file=sys.stderr, flush=True)


def _serve(server: socket.socket, heartbeat: int) -> None:
  """Process 0: accepts the others' lifelines; one that closes without saying "bye" first
  was lost."""
  sel = selectors.DefaultSelector()
  sel.register(server, selectors.EVENT_READ)
  pending: dict[socket.socket, bytes] = {}  # what each connection sent, up to a newline
  ids: dict[socket.socket, int] = {}
  while True:
    for key, _ in sel.select():
      sock = key.fileobj
      if sock is server:
        conn, _ = server.accept()
        _keepalive(conn, heartbeat)
        sel.register(conn, selectors.EVENT_READ)
        pending[conn] = b""
        continue
      try:
        data = sock.recv(256)
      except OSError:  # reset, or a keepalive timeout
        data = b""
      if data:
        *lines, pending[sock] = (pending[sock] + data).split(b"\n")
        for line in lines:
          _heard(sock, line.decode(errors="replace").strip(), ids)
        continue
      sel.unregister(sock)
      sock.close()
      pid = ids.pop(sock, None)
      with _lock:
        _state.peers.pop(pid, None)
        gone = pid is not None and pid not in _state.left
      if gone:
        _lose([pid])


def _heard(sock: socket.socket, line: str, ids: dict) -> None:
  if sock not in ids:  # the first line: who it is
    if line.isdigit() and 0 < int(line) < _state.num_processes:
      ids[sock] = int(line)
      with _lock:
        _state.peers[int(line)] = sock
  elif line == "bye":
    with _lock:
      _state.left.add(ids[sock])


def _tell_others(lost: list[int]) -> None:
  """Process 0: tells the others who was lost, and waits (a little) for them to go."""
  with _lock:
    peers = dict(_state.peers)
  for pid, sock in peers.items():
    try:
      sock.sendall(f"lost {','.join(map(str, lost))}\n".encode())
    except OSError:
      pass
  deadline = time.monotonic() + TELL_SECONDS
  while peers and time.monotonic() < deadline:
    time.sleep(0.05)
    with _lock:
      peers = set(_state.peers) - set(lost)


def _join_lifeline(heartbeat: int, timeout: int) -> None:
  """Another process: its lifeline to process 0 (failing that, only the heartbeats watch)."""
  try:
    port = int(_state.client.blocking_key_value_get(_LIFELINE, timeout * 1000))
    sock = socket.create_connection((_state.host, port), timeout=timeout)
    sock.settimeout(None)
    _keepalive(sock, heartbeat)
    sock.sendall(f"{_state.process_id}\n".encode())
  except Exception as e:  # a firewall, say: the heartbeats still notice, only later
    _warn_no_lifeline(f"to process 0 at {_state.host}", e, heartbeat)
    return
  _state.line = sock
  threading.Thread(target=_listen, args=(sock,), name="noprop_jax.distributed lifeline",
                   daemon=True).start()


def _listen(sock: socket.socket) -> None:
  """Another process: waits for process 0's word that a process was lost, or its end."""
  pending = b""
  while True:
    try:
      data = sock.recv(256)
    except OSError:
      data = b""
    if not data:
      _lose([0])  # ignored when leaving on purpose
      return
    *lines, pending = (pending + data).split(b"\n")
    for line in lines:
      word, _, ids = line.decode(errors="replace").partition(" ")
      if word == "lost" and ids:
        _lose([int(i) for i in ids.split(",") if i.isdigit()])


def _heartbeats() -> None:
  """The coordination service's view: a process whose heartbeats stopped (or that never
  reached the lifeline). get_live_nodes returns once every live process has asked."""
  everyone = list(range(_state.num_processes))
  while True:
    time.sleep(POLL_SECONDS)
    try:
      live = _state.client.get_live_nodes(everyone)
      missing = [i for i in everyone if i not in live]
      if missing:  # those leaving on purpose mark it first
        left = {k.rpartition("/")[2] for k, _ in _state.client.key_value_dir_get(_LEFT)}
        missing = [i for i in missing if str(i) not in left]
    except Exception:  # busy, or already shut down: no evidence of a loss
      continue
    if missing:
      _lose(missing)


def _leave() -> None:
  """At exit: leave together, in an order that lets process 0's service stop last."""
  import jax
  from jax._src import distributed as jax_distributed

  if jax_distributed.global_state.client is not _state.client:  # already shut down
    return
  wait = FAILED_WAIT_SECONDS if _state.failed else LEAVE_WAIT_SECONDS
  try:
    _state.client.wait_at_barrier("noprop_jax.distributed.leave", int(wait * 1000))
    together = True
  except Exception:  # the others are still busy (or lost: the watchdog says so meanwhile)
    together = False
  with _lock:
    _state.watching = False
  if together and _state.process_id != 0:
    try:  # before disconnecting: the others may see it gone before their barrier returns
      _state.client.key_value_set(f"{_LEFT}{_state.process_id}", "1")
      if _state.line is not None:
        _state.line.sendall(b"bye\n")
    except Exception:
      pass
  if _state.process_id == 0 and together:  # the others disconnect first
    deadline = time.monotonic() + GONE_WAIT_SECONDS
    while _state.peers and time.monotonic() < deadline:
      time.sleep(0.05)
  try:
    jax.distributed.shutdown()
  except Exception:  # leaving anyway: JAX's own shutdown would try again
    pass
  if _state.line is not None:  # after the disconnect: process 0 waits for this
    _state.line.close()
