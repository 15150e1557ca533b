"""Run model-written Python in bubblewrap sandboxes, each in its own short-lived processes, never in ours.

`run_programs(programs, timeout, memory_mb, workers) -> [Outcome]`. A program is either
- a sequence of source parts (one string is one part), each compiled on its own and executed in order in one
  namespace, so a part cannot swallow the next. Its pass means only "it returned": code in the same interpreter can
  always arrange that, so a program never holds trusted checks of model code; or
- a `Checked`: a model-written function and trusted code that checks it (HumanEval: prompt + completion; the prompt,
  the test and `check(entry_point)`). Its pass means the check returned, and the model's code cannot forge it.

**A pass is proven, never inferred from an exit status.** For each program we make a random token (32 bytes from
os.urandom) and two pipes. The token waits in the kernel's pipe buffer (`token` pipe, read end inside the sandbox);
it is never in argv, the environment, a file, or any process's memory before it is read. Our code inside the sandbox
(imtune.tasks.inside) runs the parts; only when the last one has returned without an exception does it read the token
from its pipe and write it to the `result` pipe, then leave with os._exit (no atexit hooks, no finalizers run).
Imtune counts a pass only if the result pipe holds exactly that token. Exiting early, an atexit hook, `os.execv`
(all our descriptors are close-on-exec), an exception, or printing anything are all failures.

**A checked run: model code and the check never share a process.** Two bwrap sandboxes, started by us for each
`Checked`, each with the isolation below (its own PID, mount, IPC and network namespaces, its own fresh uid and /tmp):
- the *function* sandbox runs the model's parts and then answers calls to `name`. Its descriptors are its stdin (its
  own source, an unnamed file), stdout and stderr (/dev/null), and the read end of a `calls` pipe and the write end
  of a `replies` pipe: nothing else of ours;
- the *checker* sandbox runs the trusted parts, binds `name` to a proxy, runs `check`, and alone holds the token
  and result pipes, and the other ends of calls and replies.
A call crosses as one line of text, a Python literal, each way; the checker parses the reply with ast.literal_eval
and takes exact bool, int, float, str, None and list/tuple/dict/set of them only, and an exception comes back as a
builtin exception of the same class (imtune.tasks.inside has the protocol). So all the model's code can decide is the
value each call returns: it cannot patch the check, the builtins, `AssertionError` or the code that writes the token
(another interpreter), reach the token or result pipe (never in its process; its /proc shows only its own PID
namespace, and it runs as another uid), exit with a success code (its exit status is never read), or hand the check
an object that compares equal to anything (only literals cross). A function that ends, hangs, answers junk or too
much fails the check; time and memory limits apply to both processes, the deadline to the pair.
Two bwrap invocations rather than one sandbox with two children: inside one sandbox the two would share a uid, a
/proc and a /tmp unless we built nested namespaces ourselves; two invocations get each separation from bwrap as it is,
for the cost of starting a second sandbox and interpreter (about 1.5 times the time per HumanEval problem).

**Isolation: bubblewrap** (`bwrap`), started by us with:
- new PID, network, IPC, UTS and cgroup namespaces: the program sees only its own processes (its parent is the
  sandbox's init, which ignores signals from inside), and a network namespace with no interface but loopback;
- a new mount namespace holding only read-only binds of /usr (and /bin, /lib, /lib64 as the host has them) and of the
  interpreter's own prefix, a fresh /proc and minimal /dev, and a private tmpfs at /tmp (the working directory and
  HOME, --size bounded). /etc, /home, /root, /work, the data and the run directories are not there at all;
- `--die-with-parent` and `--new-session`; when the program's main process ends, or we kill bwrap on timeout, the
  PID namespace ends and the kernel kills every process left in it (setsid children included);
- run as root (as here), bwrap sets up the sandbox and `setpriv` drops to a fresh random uid with no capabilities,
  no supplementary groups and no-new-privileges before the interpreter starts; run as another user, bwrap creates a
  user namespace itself (`--unshare-all --cap-drop ALL`);
- rlimits set by our code inside, before the model's code: processes (RLIMIT_NPROC, per sandbox: the uid is fresh, or
  the user namespace is new), address space (memory_mb), CPU seconds (timeout + 1), file size, open files, no core
  dumps.
- `python -I -S`: the standard library only (no site-packages), no PYTHON* variables; the environment is PATH, HOME,
  TMPDIR and LANG only. stdout is discarded; stderr goes to an unnamed temporary file whose last line becomes the
  outcome's detail (at most 200 characters).
Nothing of a run stays behind: no files are written on the host (programs arrive on stdin, from unnamed temporary
files), and every process is gone when run_programs returns.

Not isolated: the kernel (no seccomp filter; a kernel exploit escapes any namespace sandbox), CPU time of the host
within the limits, and what /usr and the interpreter's prefix contain (readable). Where bubblewrap is missing or cannot
create its namespaces, run_programs refuses (SandboxUnavailable, a UsageError saying why) unless
`unsafe_no_sandbox=True` (`--unsafe-no-sandbox`): then the same code, token and rlimits (but no process limit) apply
in plain `python -I -S` children, each in its own session and temporary folder (removed afterwards), and the file
system, network and other processes are reachable (a checked run's function can then reach its checker too: both
run as your uid).

At most `workers` programs run at once. They are started and polled from this one thread (no preexec_fn, no threads).
"""
from __future__ import annotations

import marshal
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from imtune import files
from imtune.types import UsageError

PROCESS_LIMIT = 64  # processes (threads count too) one program may have at once
FILE_LIMIT = 16 * 2**20  # bytes: the largest file (stderr included) a program may write
TMPFS_SIZE = 64 * 2**20  # bytes: all of the private /tmp
OPEN_FILES = 64
DETAIL_CHARS = 200

# What the sandboxed interpreter runs (`python -I -S -c INSIDE`): imtune.tasks.inside.
INSIDE = Path(__file__).with_name("inside.py").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Checked:
    """A model-written function and the trusted code that checks it, run in two sandboxes (see the module's doc)."""
    function: tuple[str, ...]  # model-written source parts that define `name` (HumanEval: prompt + completion)
    name: str  # the function the check calls
    setup: tuple[str, ...]  # trusted parts run first in the checker (HumanEval: prompt, test); then `name` is bound
    check: str  # trusted code that passes by returning (HumanEval: check(entry_point)), `name` being a proxy


class SandboxUnavailable(UsageError):
    """Model code would have run without isolation: bubblewrap is missing or cannot create its namespaces."""


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed" (the harness returned the token after the last part), "failed" or "timed out"
    detail: str = ""  # the last line of stderr, the signal, or the time limit

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def _interpreter() -> tuple[str, str]:
    """The real interpreter behind sys.executable (not a venv's symlink) and the prefix it needs."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable)), os.path.realpath(sys.base_prefix)


def _mounts(prefix: str) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        parents = prefix.strip("/").split("/")[:-1]  # made 0755: bwrap would copy the host's modes (/root: 0700)
        for i in range(1, len(parents) + 1):
            args += ["--perms", "0755", "--dir", "/" + "/".join(parents[:i])]
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_SIZE), "--perms", "1777", "--tmpfs", "/tmp",
             "--chdir", "/tmp"]
    return args


def sandbox_command(bwrap: str) -> list[str]:
    """The command line that starts the interpreter inside bubblewrap (`-c INSIDE` follows)."""
    python, prefix = _interpreter()
    common = ["--die-with-parent", "--new-session", *_mounts(prefix)]
    if os.geteuid() == 0:  # privileged bwrap; setpriv then drops to a uid no other process has
        uid = str(random.SystemRandom().randrange(2**30, 2**31))
        return [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                *common, "--", shutil.which("setpriv") or "/usr/bin/setpriv", "--reuid", uid, "--regid", uid,
                "--clear-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
                python, "-I", "-S"]
    return [bwrap, "--unshare-all", "--cap-drop", "ALL", *common, "--", python, "-I", "-S"]


@dataclass
class _Process:
    proc: subprocess.Popen
    stderr: object  # the unnamed temporary file its stderr goes to, or None (discarded)
    workdir: str | None  # without the sandbox only: a temporary folder of ours, removed at the end


@dataclass
class _Job:
    main: _Process  # the program, or a checked run's checker: the job ends when it does
    function: _Process | None  # a checked run's model-written function
    deadline: float
    token: bytes
    result_fd: int  # our read end of the result pipe


def _rlimits(timeout: float, memory_mb: int, sandboxed: bool) -> dict[str, int]:
    limits = {"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": int(timeout) + 1, "RLIMIT_FSIZE": FILE_LIMIT,
              "RLIMIT_NOFILE": OPEN_FILES, "RLIMIT_CORE": 0}
    if sandboxed:  # RLIMIT_NPROC counts a uid's processes: per program only where the uid (or user namespace) is new
        limits["RLIMIT_NPROC"] = PROCESS_LIMIT
    return limits


def _spawn(role: str, fds: tuple[int, ...], source: dict, bwrap: str | None, timeout: float, memory_mb: int,
           keep_stderr: bool) -> _Process:
    """Start INSIDE as `role` with only the descriptors `fds`; its stdin (an unnamed file) holds `source` and its
    settings, in marshal format."""
    command = sandbox_command(bwrap) if bwrap else [_interpreter()[0], "-I", "-S"]  # a fresh uid for each process
    settings = {**source, "role": role, "fds": list(fds), "rlimits": _rlimits(timeout, memory_mb, bwrap is not None)}
    with tempfile.TemporaryFile() as stdin:
        stdin.write(marshal.dumps(settings))
        stdin.seek(0)
        err = tempfile.TemporaryFile() if keep_stderr else None
        workdir = None if bwrap else str(files.temp_dir(prefix="imtune-unsandboxed-"))
        home = workdir or "/tmp"  # in the sandbox, /tmp is its private tmpfs
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen([*command, "-c", INSIDE], stdin=stdin,
                                    stdout=subprocess.DEVNULL, stderr=err or subprocess.DEVNULL, env=env,
                                    cwd=workdir or "/", pass_fds=fds, start_new_session=True)
        except OSError:
            if err is not None:
                err.close()
            _discard(workdir)
            raise
    return _Process(proc, err, workdir)


def _start(program, bwrap: str | None, timeout: float, memory_mb: int) -> _Job:
    token = secrets.token_hex(32).encode()
    token_r, token_w = os.pipe()
    result_r, result_w = os.pipe()
    os.write(token_w, token)  # 64 bytes: sits in the pipe buffer until the harness reads it
    os.close(token_w)
    theirs = [token_r, result_w]  # the ends the sandboxes hold: ours are closed once they have started
    function = None
    try:
        if isinstance(program, Checked):
            call_r, call_w = os.pipe()
            reply_r, reply_w = os.pipe()
            theirs += [call_r, call_w, reply_r, reply_w]
            function = _spawn("function", (call_r, reply_w), {"parts": list(program.function), "name": program.name},
                              bwrap, timeout, memory_mb, keep_stderr=False)
            main = _spawn("check", (token_r, result_w, call_w, reply_r),
                          {"parts": list(program.setup), "name": program.name, "check": program.check},
                          bwrap, timeout, memory_mb, keep_stderr=True)
        else:
            parts = [program] if isinstance(program, str) else list(program)
            main = _spawn("program", (token_r, result_w), {"parts": parts}, bwrap, timeout, memory_mb,
                          keep_stderr=True)
    except OSError:
        if function is not None:
            _end(function)
        os.close(result_r)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    os.set_blocking(result_r, False)
    return _Job(main, function, time.monotonic() + timeout, token, result_r)


def _exited(job: _Job) -> bool:
    """Has bwrap (or the program) exited? Asked without reaping, so its group id stays ours until _finish kills it."""
    return os.waitid(os.P_PID, job.main.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _drain(fd: int, limit: int = 4096) -> bytes:
    data = b""
    while len(data) <= limit:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _end(process: _Process) -> int:
    """Kill what is left of one sandbox and clean up after it; its exit status."""
    try:  # bwrap's group: killing bwrap ends the sandbox's PID namespace (--die-with-parent), and all in it
        os.killpg(process.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    rc = process.proc.wait()
    _discard(process.workdir)
    return rc


def _discard(workdir: str | None) -> None:
    """Remove an unsandboxed process's scratch directory (best effort; a link put in its place is left alone)."""
    if workdir:
        try:
            files.remove(workdir)
        except (OSError, UsageError):
            pass


def _finish(job: _Job, timed_out: bool, timeout: float) -> Outcome:
    rc = _end(job.main)
    if job.function is not None:
        _end(job.function)
    reported = _drain(job.result_fd)
    os.close(job.result_fd)
    job.main.stderr.seek(0, os.SEEK_END)
    job.main.stderr.seek(max(0, job.main.stderr.tell() - 4096))
    tail = job.main.stderr.read().decode("utf-8", "replace")
    job.main.stderr.close()
    if timed_out:
        return Outcome("timed out", f"after {timeout:g} s")
    if reported == job.token:
        return Outcome("passed")
    if rc == 0:  # the harness exits 1 after a failed part: 0 without the token is an early exit, whatever it printed
        return Outcome("failed", "ended (exit status 0) before the checks returned")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if lines:
        return Outcome("failed", lines[-1][:DETAIL_CHARS])
    if rc < 0:
        return Outcome("failed", f"killed by {signal.Signals(-rc).name}")
    return Outcome("failed", f"ended (exit status {rc}) before the checks returned")


@lru_cache(maxsize=1)
def _probe(bwrap: str) -> str:
    """'' if a program runs and passes inside bubblewrap here, else what went wrong."""
    job = _start(["pass"], bwrap, 30.0, 256)
    while not _exited(job) and time.monotonic() < job.deadline:
        time.sleep(0.005)
    outcome = _finish(job, not _exited(job), 30.0)
    return "" if outcome.passed else str(outcome)


@cache
def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def find_sandbox(unsafe_no_sandbox: bool = False) -> str | None:
    """The bubblewrap that programs run under, after checking that it works here; None for no sandbox (only with
    unsafe_no_sandbox, after a warning). Otherwise a SandboxUnavailable that says why and what to do."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        why = "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap; `make setup` tries)"
    else:
        problem = _probe(bwrap)
        if not problem:
            return bwrap
        why = (f"bubblewrap cannot create its sandbox here ({problem}); it needs unprivileged user namespaces "
               "(sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu "
               "kernel.apparmor_restrict_unprivileged_userns=0), or to run as root")
    if unsafe_no_sandbox:
        _warn(f"imtune: warning: running model code WITHOUT a sandbox (--unsafe-no-sandbox): {why}")
        return None
    raise SandboxUnavailable(f"refusing to run model-written code without isolation: {why}. Pass "
                             "--unsafe-no-sandbox to run it anyway (it can then read and write your files and reach "
                             "the network), or score the samples on a machine with bubblewrap.")


def run_programs(programs: list, timeout: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                 progress: bool = False, unsafe_no_sandbox: bool = False) -> list[Outcome]:
    """The outcome of running each program (a string, a sequence of source parts, or a Checked), in order; at most
    `workers` at a time."""
    bwrap = find_sandbox(unsafe_no_sandbox)
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
                running[i] = _start(programs[i], bwrap, timeout, memory_mb)
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
