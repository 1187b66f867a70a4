"""Run untrusted Python (benchmark solutions, model-written code) in a sandboxed subprocess.

`run_python(code, limits)` writes the code to `main.py` in a fresh directory and runs it there through a launcher
(this file, run as a script, standard library only) that applies, before the code starts:

- **resource limits** (`setrlimit`): CPU seconds, address space (memory), size of any file written (also bounds
  stdout and stderr, which go to files), number of processes of the sandbox's user, open files, no core dumps;
  the wall-clock limit is the caller's (`Popen.wait` then a kill of the whole process group).
- **no privileges** when started as root: the code runs as a user of its own, a uid from `SANDBOX_UIDS` that no
  other running sandbox holds and no process has (claimed with a lock for as long as the sandbox runs; `nobody`
  where the lock folder cannot be trusted), when the interpreter is readable by others; else as root with every
  capability dropped (bounding set emptied, so nothing it execs regains any). A user of its own means sandboxes that
  run side by side cannot signal or trace one another, and each has the whole process limit (the limit counts all
  the processes of a user). The kernel does not apply the process limit to root, so as root the limit is a `pids`
  cgroup (v2, or v1's `pids` hierarchy).
- **namespaces** where the kernel allows them (as root; without root through an unprivileged user namespace): a
  new network namespace (only a loopback that is down: no connection leaves it) and a new PID namespace (the code
  runs as its init; when it ends or is killed, every process it started is killed by the kernel, so a fork bomb
  cannot outlive the run).
- **Landlock** (Linux ≥ 5.13, no root needed): the code may read only the interpreter's and the system's library
  folders, and write only inside its directory; with Landlock ABI ≥ 4 it may not bind or connect TCP sockets, with
  ABI ≥ 6 it may not signal processes outside the sandbox or reach abstract UNIX sockets.
- **a clean environment**: PATH, HOME and TMPDIR (its directory), a UTF-8 locale; nothing of the caller's
  environment (tokens, keys) is inherited. The interpreter runs isolated (`-I`: no user site, no PYTHON* variables).

`guards()` says which of these hold on this machine; `run_python` fails with `SandboxUnavailable` when the caller
requires a guard (`Limits.require`) that the machine cannot give, instead of running the code less confined.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

NOBODY = 65534
SANDBOX_UIDS = range(1_870_000_000, 1_870_001_024)  # one per running sandbox (as root); no account has them
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_CAPBSET_DROP = 38, 1, 24
CAP_LAST = 63
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
# Landlock access rights (include/uapi/linux/landlock.h)
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_ALL_ABI1 = (1 << 13) - 1  # execute … make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


class SandboxUnavailable(RuntimeError):
    """A guard the caller requires is not available on this machine."""


@dataclass
class Limits:
    cpu_s: float = 10.0
    wall_s: float = 20.0
    memory_mb: int = 1024
    file_mb: int = 16
    processes: int = 32
    open_files: int = 128
    output_chars: int = 20_000
    network: bool = False
    require: tuple[str, ...] = ()  # guard names from `guards()` that must hold, e.g. ("landlock", "netns")


@dataclass
class Result:
    status: str  # ok | error | timeout | memory | output_limit
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    workdir: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is off or absent."""
    r = _libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(r), 0)


_GUARDS: dict | None = None


def guards() -> dict:
    """Which guards this machine gives (probed once, in a child process, the way `run_python` applies them)."""
    global _GUARDS
    if _GUARDS is None:
        probe = subprocess.Popen(
            [sys.executable, "-I", __file__, "--probe"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stdout, stderr = probe.communicate(timeout=30)
        _remove_cgroup(probe.pid)
        try:
            _GUARDS = json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            _GUARDS = {"error": (stderr or stdout)[-500:]}
        _GUARDS.setdefault("rlimits", True)
        _GUARDS.setdefault("clean_env", True)
    return dict(_GUARDS)


def _read_only_paths() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths |= {"/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives"}
    paths |= {os.path.realpath(p) for p in list(paths)}
    return sorted(p for p in paths if os.path.exists(p))


def _unshare(flags: int) -> bool:
    return _libc().unshare(ctypes.c_int(flags)) == 0


def _write_id_maps(uid: int, gid: int) -> None:
    """Inside a new user namespace: map our own uid and gid, so the code runs as itself, not as the overflow id."""
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError:
        pass


def _landlock(workdir: str, read_only: list[str]) -> int:
    """Restrict this process (and what it execs) to reading `read_only` and writing `workdir`; returns the ABI."""
    libc = _libc()
    abi = landlock_abi()
    if abi < 1:
        return 0
    fs = FS_ALL_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def allow(path: str, access: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if os.path.isfile(path):
                access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
            rule = PathBeneath(access & fs, fd)
            if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        finally:
            os.close(fd)

    for path in read_only:
        allow(path, READ_ONLY)
    allow("/dev/null", FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE)
    for dev in ("/dev/urandom", "/dev/random", "/dev/zero"):
        if os.path.exists(dev):
            allow(dev, FS_READ_FILE)
    allow(workdir, fs)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
    if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return abi


def _readable_by_nobody(path: str) -> bool:
    """Whether uid/gid 65534 can reach and read `path` through others' permission bits."""
    parts = Path(os.path.realpath(path)).parts
    for i in range(1, len(parts)):
        if not os.stat(os.path.join(*parts[:i])).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


def _cgroup_root() -> Path | None:
    """A writable cgroup hierarchy with the pids controller: v2 (root or `unified`) or v1's `pids`."""
    for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        controllers = base / "cgroup.controllers"
        if controllers.exists() and "pids" in controllers.read_text().split() and os.access(base, os.W_OK):
            return base
    v1 = Path("/sys/fs/cgroup/pids")
    return v1 if (v1 / "cgroup.procs").exists() and os.access(v1, os.W_OK) else None


def cgroup_path(launcher_pid: int) -> Path | None:
    root = _cgroup_root()
    return root / f"align-sandbox-{launcher_pid}" if root else None


def _join_pids_cgroup(processes: int) -> bool:
    """As root: put this process (and so its children) in a new cgroup allowing `processes` tasks."""
    path = cgroup_path(os.getpid())
    if path is None:
        return False
    try:
        path.mkdir(exist_ok=True)
        (path / "pids.max").write_text(str(processes))
        (path / "cgroup.procs").write_text(str(os.getpid()))
        return True
    except OSError:
        return False


def _drop_capabilities() -> None:
    libc = _libc()
    for cap in range(CAP_LAST + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last capability: ignored
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: all empty
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _process_uids() -> list[int]:
    """The uid of every process on the machine (as far as /proc shows them)."""
    uids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                uids.append(os.stat(f"/proc/{pid}").st_uid)
            except OSError:
                pass
    return uids


def _enter(spec: dict) -> dict:
    """In the launcher: namespaces, then (in the forked child) user, limits and Landlock. Returns what was applied;
    in the parent (the launcher) this function does not return: it waits for the child and exits with its status."""
    applied = {"root": os.geteuid() == 0}
    uid, gid = os.getuid(), os.getgid()
    # the process limit counts every process of the user, so the sandbox's share comes on top of what it runs
    # already (counted before a user namespace would show other users' processes as the overflow id)
    running = 0 if applied["root"] else _process_uids().count(uid)
    flags = CLONE_NEWPID | (0 if spec["network"] else CLONE_NEWNET)
    if applied["root"]:
        namespaces = _unshare(flags)
    else:
        namespaces = _unshare(flags | CLONE_NEWUSER)
        if namespaces:
            _write_id_maps(uid, gid)
    applied["netns"] = namespaces and not spec["network"]
    applied["pidns"] = namespaces
    if applied["root"]:
        applied["pids_cgroup"] = _join_pids_cgroup(spec["processes"] + 2)
    pid = os.fork()
    if pid:  # the launcher: the init of the new PID namespace is its child; its end ends the namespace
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: (os.kill(pid, signal.SIGKILL), os._exit(137)))
        signal.signal(signal.SIGINT, lambda *_: os.kill(pid, signal.SIGINT))  # an interrupt, for the code to handle
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    applied["uid_drop"] = applied["root"] and spec.get("uid") is not None
    if applied["uid_drop"]:
        uid = spec["uid"]
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    elif applied["root"]:
        _drop_capabilities()
    applied["no_privileges"] = True
    mb = 1024 * 1024
    cpu = max(1, int(spec["cpu_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (spec["memory_mb"] * mb, spec["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_mb"] * mb, spec["file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec["open_files"], spec["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = spec["processes"] + running
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    applied["rlimits"] = True
    applied["process_limit"] = applied.get("pids_cgroup", False) or not applied["root"] or applied["uid_drop"]
    try:
        applied["landlock"] = _landlock(spec["workdir"], spec["read_only"])
    except OSError as e:
        applied["landlock"] = 0
        applied["landlock_error"] = str(e)
    applied["clean_env"] = True
    return applied


def _launch(spec: dict) -> None:
    applied = _enter(spec)
    missing = [g for g in spec["require"] if not applied.get(g)]
    if missing:
        sys.stderr.write(f"sandbox: required guards unavailable: {', '.join(missing)} ({applied})\n")
        os._exit(86)
    os.chdir(spec["workdir"])
    os.execve(sys.executable, [sys.executable, "-I", *spec["argv"]], spec["env"])


def _probe() -> None:
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)
        spec = {"network": False, "cpu_s": 5, "memory_mb": 512, "file_mb": 1, "open_files": 64, "processes": 8}
        spec["uid"] = NOBODY if os.geteuid() == 0 and _readable_by_nobody(sys.executable) else None  # as `run_python`
        applied = _enter({**spec, "workdir": d, "read_only": _read_only_paths()})
        print(json.dumps(applied))
        sys.stdout.flush()
        os._exit(0)


def sandbox_env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "MPLBACKEND": "Agg",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }


def give_to_sandbox(work: Path, uid: int | None) -> None:
    """Where the code runs as a user of its own (`uid`, not None), its directory must be that user's."""
    if uid is not None:
        for p in [work, *work.rglob("*")]:
            os.chown(p, uid, uid)


def _lock_folder() -> Path | None:
    """Where the uid claims live: a folder only root can write (None when an existing one is not)."""
    folder = Path(tempfile.gettempdir()) / "align-sandbox-uids"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return None
    trusted = st.st_uid == 0 and (st.st_mode & 0o077) == 0 and os.path.isdir(folder) and not folder.is_symlink()
    return folder if trusted else None


def claim_uid() -> tuple[int | None, int | None]:
    """(the uid the next sandbox runs as, the lock that holds it until `release`): None, None when the code will
    not change user (not root, or an interpreter closed to others); `nobody` and no lock without a trusted lock
    folder. A uid is taken only when no process runs as it (a sandbox whose caller died may still run)."""
    if os.geteuid() != 0 or not _readable_by_nobody(sys.executable):
        return None, None
    folder = _lock_folder()
    if folder is None:
        return NOBODY, None
    running = set(_process_uids())
    for uid in SANDBOX_UIDS:
        if uid in running:
            continue
        fd = os.open(folder / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    raise SandboxUnavailable(f"all {len(SANDBOX_UIDS)} sandbox users are taken by running sandboxes")


def release(proc: subprocess.Popen) -> None:
    """After a sandboxed process ended: its cgroup removed, its uid free for the next sandbox."""
    _remove_cgroup(proc.pid)
    lock = getattr(proc, "sandbox_lock", None)
    if lock is not None:
        os.close(lock)
        proc.sandbox_lock = None


def start_process(
    argv: list[str], limits: Limits, work: Path, env: dict[str, str] | None = None, **popen
) -> subprocess.Popen:
    """Start `python -I ARGV` in the sandbox, in `work`, through the launcher (see the module docstring). The caller
    waits for it; killing its process group (it leads a new session) ends everything it started; then
    `release(proc)`. `proc.sandbox_uid` is the user it runs as (None: it did not change user)."""
    uid, lock = claim_uid()
    try:
        give_to_sandbox(work, uid)
        env = env or sandbox_env(work)
        spec = {**asdict(limits), "workdir": str(work), "read_only": _read_only_paths(), "env": env, "uid": uid}
        spec["argv"], spec["require"] = list(argv), list(limits.require)
        proc = subprocess.Popen(
            [sys.executable, "-I", __file__, "--launch", json.dumps(spec)],
            stdin=popen.pop("stdin", subprocess.DEVNULL),
            start_new_session=True,
            cwd=str(work),
            env=env,
            **popen,
        )
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    proc.sandbox_uid, proc.sandbox_lock = uid, lock
    return proc


def run_python(
    code: str,
    limits: Limits | None = None,
    files: dict[str, bytes | str] | None = None,
    workdir: str | Path | None = None,
    keep: bool = False,
) -> Result:
    """Run `code` as `main.py` in `workdir` (a new temporary directory when None; removed afterwards unless `keep`
    or given). `files` are written there first (the user's uploads). The result lists the files left there."""
    limits = limits or Limits()
    if limits.require:
        have = guards()
        missing = [g for g in limits.require if not have.get(g)]
        if missing:
            raise SandboxUnavailable(f"this machine cannot give the sandbox guards {missing}: {have}")
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="align-sandbox-") if own else workdir)
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="align-sandbox-log-"))
    try:
        for name, content in (files or {}).items():
            target = work / name
            if work.resolve() not in target.resolve().parents:
                raise ValueError(f"file name {name!r} leaves the sandbox directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        (work / "main.py").write_text(code, encoding="utf-8")
        start = time.monotonic()
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            proc = start_process(["main.py"], limits, work, stdout=out, stderr=err)
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.returncode is None:  # out of time, or the caller interrupted: nothing of it outlives this
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                release(proc)
        seconds = time.monotonic() - start
        stdout = _read_capped(logs / "out", limits.output_chars)
        stderr = _read_capped(logs / "err", limits.output_chars)
        rc = proc.returncode
        if rc == 86 and stderr.startswith("sandbox: required guards"):
            raise SandboxUnavailable(stderr.strip())
        if timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGKILL):
            status = "timeout"
        elif rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or (
            rc != 0 and max((logs / n).stat().st_size for n in ("out", "err")) >= limits.file_mb * 1024 * 1024
        ):
            status = "output_limit"
        elif rc != 0 and "MemoryError" in stderr:
            status = "memory"
        else:
            status = "ok" if rc == 0 else "error"
        left = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and p.name != "main.py")
        return Result(status, None if timed_out else rc, stdout, stderr, seconds, str(work), left)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)


def _remove_cgroup(launcher_pid: int) -> None:
    path = cgroup_path(launcher_pid) if os.geteuid() == 0 else None
    if path is None or not path.exists():
        return
    for _ in range(50):  # its tasks are gone once the kernel has reaped the killed namespace
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit * 4 + 4)
    text = data.decode("utf-8", errors="replace")
    return text[:limit] + ("\n[output truncated]" if len(text) > limit else "")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--launch"]:
        _launch(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["--probe"]:
        _probe()
