"""Run model-written Python programs, each in its own short-lived process, never in ours.

`run_programs(programs, timeout, memory_mb, workers) -> [Outcome]`. What each program gets:

- a fresh interpreter, `python -I` (isolated mode: no PYTHON* variables, no user site-packages, the script's folder
  not on sys.path), started in a new session so that on timeout its whole process group is killed;
- resource limits set in `preexec_fn` before exec: RLIMIT_AS = memory_mb (address space: a memory bomb gets a
  MemoryError or dies), RLIMIT_CPU = timeout + 1 s (a backstop to the wall-clock timeout), RLIMIT_FSIZE = 16 MiB
  (no file, stderr included, grows past that), RLIMIT_CORE = 0;
- a fresh temporary directory as working directory and HOME, removed afterwards, and a minimal environment
  (PATH, HOME, TMPDIR, LANG: no proxies, no tokens);
- no network, two ways: (1) where the system allows it (root, or unprivileged user namespaces) the program runs in a
  new, empty network namespace (`unshare -n`, or `unshare -rn`), where the only interface is a loopback that is down,
  so even code that gets past (2) reaches nothing, the host's own 127.0.0.1 included; `network_isolation()` says which
  was found. (2) Always, a prelude (GUARD) runs before the program and replaces `socket.socket`, `create_connection`,
  `getaddrinfo` and friends with functions that raise OSError, and disables `os.system`, `os.fork`, `os.kill`,
  `subprocess.Popen` and `shutil.rmtree` (HumanEval's own "reliability guard" idea). The prelude is best effort
  (Python code can undo it); the process, the limits and the namespace are the walls.
- stdout is discarded; stderr goes to a file in its directory and its last line is the outcome's detail.

Not isolated: the file system. A program can read, and write where this user may, outside its directory. For models
you do not trust at all, run the benchmark as an unprivileged user or in a container.

At most `workers` programs run at once. They are started and polled from this one thread (no thread pool), because
`preexec_fn` is not safe in a process that runs threads.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

FSIZE_LIMIT = 16 * 2**20

# Runs in the child before the program (python -I -c GUARD program.py). Kept short and dependency-free.
GUARD = r"""
import os, runpy, shutil, socket, subprocess, sys
def _blocked(*a, **k):
    raise OSError("disabled in the imtune sandbox")
class _NoSocket:
    def __init__(self, *a, **k):
        _blocked()
socket.socket = socket.SocketType = _NoSocket
import _socket
_socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
              "gethostbyname_ex", "gethostbyaddr"):
    setattr(socket, _name, _blocked)
for _mod, _names in ((os, ("system", "fork", "forkpty", "kill", "killpg")),
                     (subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput",
                                   "getstatusoutput")),
                     (shutil, ("rmtree", "move", "chown"))):
    for _name in _names:
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked)
del _mod, _name, _names
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed" (exit status 0), "failed" (anything else) or "timed out"
    detail: str = ""  # the last line of stderr, the signal, or the time limit

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


@lru_cache(maxsize=1)
def network_isolation() -> tuple[str, ...]:
    """The command prefix that puts a process in a new network namespace here, or () when none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "-n"), (exe, "-rn")):
        try:
            ok = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return prefix
    return ()


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:  # runs in the child between fork and exec: only plain system calls here
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


@dataclass
class _Job:
    proc: subprocess.Popen
    deadline: float
    workdir: str
    stderr: object  # the open file stderr goes to


def _start(program: str, prefix: tuple[str, ...], timeout: float, memory_mb: int) -> _Job:
    workdir = tempfile.mkdtemp(prefix="imtune-sandbox-")
    with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
        f.write(program)
    env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    err = open(os.path.join(workdir, "stderr.txt"), "w+b")
    proc = subprocess.Popen([*prefix, sys.executable, "-I", "-c", GUARD, "program.py"], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            preexec_fn=_limits(memory_mb * 2**20, int(timeout) + 1), start_new_session=True)
    return _Job(proc, time.monotonic() + timeout, workdir, err)


def _exited(job: _Job) -> bool:
    """Has the program exited? Asked without reaping it, so its group id stays ours until _finish kills the group."""
    return os.waitid(os.P_PID, job.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _finish(job: _Job, timed_out: bool, timeout: float) -> Outcome:
    try:  # the session holds the program and anything it started: end them all (our own child's group)
        os.killpg(job.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    rc = job.proc.wait()
    job.stderr.seek(0, os.SEEK_END)
    job.stderr.seek(max(0, job.stderr.tell() - 4096))
    tail = job.stderr.read().decode("utf-8", "replace")
    job.stderr.close()
    shutil.rmtree(job.workdir, ignore_errors=True)
    if timed_out:
        return Outcome("timed out", f"after {timeout:g} s")
    if rc == 0:
        return Outcome("passed")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if lines:
        return Outcome("failed", lines[-1][:200])
    if rc < 0:
        return Outcome("failed", f"killed by {signal.Signals(-rc).name}")
    return Outcome("failed", f"exit status {rc}")


def run_programs(programs: list[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                 progress: bool = False) -> list[Outcome]:
    """The outcome of running each program, in order; at most `workers` at a time."""
    prefix = network_isolation()
    outcomes: list[Outcome | None] = [None] * len(programs)
    queue = list(reversed(range(len(programs))))
    running: dict[int, _Job] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="execute", unit="program")
    try:
        while queue or running:
            while queue and len(running) < max(1, workers):
                i = queue.pop()
                running[i] = _start(programs[i], prefix, timeout, memory_mb)
            time.sleep(0.002)
            now = time.monotonic()
            for i, job in list(running.items()):
                exited = _exited(job)
                if exited or now > job.deadline:
                    outcomes[i] = _finish(job, not exited, timeout)
                    del running[i]
                    if bar is not None:
                        bar.update(1)
    finally:
        for job in running.values():  # interrupted: leave nothing behind
            _finish(job, True, timeout)
        if bar is not None:
            bar.close()
    return outcomes  # type: ignore[return-value]
