"""The sandbox that runs benchmark solutions and model-written code (`align/core/sandbox.py`).

What these tests prove, on the machine they run on: each attack below, run as the sandboxed code, fails (a fork bomb
is bounded and leaves no process behind, an infinite loop is stopped by its CPU limit, a 10 GB allocation raises
MemoryError, TCP connections to the outside and to this machine are refused, files outside the sandbox directory
cannot be read or written, the caller's environment is neither inherited nor readable through /proc, output is
capped, the caller cannot be signalled). They run as root (CI's case) and, where `setpriv` can start a process as
`nobody`, once more without root. What they cannot prove: that no other kernel interface escapes (the guards are
Landlock, namespaces, rlimits and dropped privileges, not a virtual machine), nor anything on a machine whose kernel
lacks Landlock or user namespaces — there `guards()` says which are missing and `Limits.require` refuses to run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from align.core import sandbox
from align.core.sandbox import Limits, SandboxUnavailable, guards, run_python

ALL_GUARDS = ("netns", "pidns", "landlock", "process_limit", "no_privileges", "rlimits", "clean_env")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's guards are Linux's")


def run(code: str, **limits) -> sandbox.Result:
    return run_python(textwrap.dedent(code), Limits(**{"cpu_s": 2, "wall_s": 15, **limits}, require=ALL_GUARDS))


def test_this_machine_gives_every_guard():
    g = guards()
    missing = [name for name in ALL_GUARDS if not g.get(name)]
    assert not missing, f"guards missing on this machine: {missing} ({g})"
    assert g["landlock"] >= 4  # TCP connect/bind rules


def test_ordinary_code_runs_and_writes_its_own_directory():
    r = run("open('out.txt', 'w').write('42'); print(open('out.txt').read()); import json, math; print(math.pi)")
    assert r.ok, r.stderr
    assert r.stdout.splitlines() == ["42", str(__import__("math").pi)]
    assert r.files == ["out.txt"]


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = run("while True: pass", cpu_s=1, wall_s=20)
    assert r.status == "timeout"
    assert r.seconds < 10  # the CPU limit, not the wall clock, ended it


def test_wall_clock_limit_stops_a_sleeper():
    r = run("import time; time.sleep(60)", wall_s=1.5)
    assert r.status == "timeout" and r.seconds < 10


def test_huge_allocation_fails_with_memory_error():
    r = run("x = bytearray(10 * 1024**3)", memory_mb=512)
    assert r.status == "memory", r.stderr


def _processes() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_fork_bomb_is_bounded_and_leaves_nothing_behind():
    before = _processes()
    counted = run(
        """
        import os, time
        n = 0
        for _ in range(500):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print(n)
        """,
        processes=16,
        wall_s=10,
    )
    assert counted.ok, counted.stderr
    assert int(counted.stdout) <= 16
    bomb = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", wall_s=3)
    assert bomb.status == "timeout"
    cmdlines = [_cmdline(p) for p in _processes() - before]
    assert not [c for c in cmdlines if b"main.py" in c or b"--launch" in c]


SIDE_BY_SIDE = """
import json, sys, threading, time
sys.path.insert(0, {folder!r})
import sandbox

def fork_and_hold(n, hold):
    return (
        "import os, time\\nn = 0\\nfor _ in range(%d):\\n    try:\\n        if os.fork() == 0:\\n"
        "            time.sleep(%s); os._exit(0)\\n        n += 1\\n    except OSError:\\n        break\\n"
        "print(os.getuid(), n, flush=True)\\ntime.sleep(%s)" % (n, hold, hold)
    )

limits = sandbox.Limits(cpu_s=2, wall_s=20, processes=16)
out = {{}}
hog = threading.Thread(target=lambda: out.update(hog=sandbox.run_python(fork_and_hold(64, 6), limits).stdout))
hog.start()
time.sleep(2.5)  # the hog holds its processes for 6 s
out["other"] = sandbox.run_python(fork_and_hold(8, 0.5), limits).stdout
hog.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK), reason="needs root and a system Python"
)
def test_sandboxes_side_by_side_run_as_users_of_their_own(tmp_path):
    """As root with an interpreter others may run (here the system's Python; the module uses only the standard
    library), each sandbox runs as a uid of its own. Two at once: one that uses up its process limit leaves the
    other its whole limit (the limit counts all the processes of a user: with one shared user the second could not
    fork), and neither can signal the other."""
    if not sandbox._readable_by_nobody("/usr/bin/python3"):
        pytest.skip("the system Python is closed to other users")
    script = tmp_path / "side_by_side.py"
    script.write_text(SIDE_BY_SIDE.format(folder=str(Path(sandbox.__file__).parent)))
    done = subprocess.run(["/usr/bin/python3", "-I", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    (hog_uid, hog_n), (other_uid, other_n) = (map(int, out[k].split()) for k in ("hog", "other"))
    assert 8 <= hog_n <= 16 and other_n == 8, out
    assert hog_uid != other_uid and {hog_uid, other_uid} <= set(sandbox.SANDBOX_UIDS), out


def test_an_interrupted_caller_leaves_no_sandboxed_process(monkeypatch):
    """Ctrl-C while the code runs: the caller's KeyboardInterrupt comes through, and the code is killed first."""
    guards()  # probed before the patch below
    before = _processes()
    real_wait = subprocess.Popen.wait

    def interrupted(self, timeout=None):
        if timeout is not None:  # run_python's wait for the code: interrupted as by Ctrl-C once the code runs
            with contextlib.suppress(subprocess.TimeoutExpired):
                real_wait(self, timeout=2)
            raise KeyboardInterrupt
        return real_wait(self)

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("import time; time.sleep(60)", wall_s=30)
    monkeypatch.undo()
    assert not [p for p in _processes() - before if b"main.py" in _cmdline(p) or b"--launch" in _cmdline(p)]


def test_no_network_out_or_to_this_machine():
    # a server on this machine's loopback, outside the sandbox: the sandbox must not reach it
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = run(
            f"""
            import socket
            for host, port in (("127.0.0.1", {port}), ("1.1.1.1", 80), ("::1", {port})):
                try:
                    socket.create_connection((host, port), timeout=2)
                    print("connected", host)
                except OSError as e:
                    print("refused", host, type(e).__name__)
            """
        )
    finally:
        server.close()
    assert r.ok, r.stderr
    assert "connected" not in r.stdout and r.stdout.count("refused") == 3


def test_files_outside_the_directory_cannot_be_read_or_written(tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    outside = tmp_path / "written.txt"
    ssh = Path.home() / ".ssh"
    r = run(
        f"""
        for path in ({str(secret)!r}, {str(ssh / "id_rsa")!r}, {str(ssh / "authorized_keys")!r}, "/etc/passwd"):
            try:
                print("read", path, open(path).read()[:20])
            except OSError as e:
                print("denied", path, type(e).__name__)
        for path in ({str(outside)!r}, "/tmp/escaped.txt", "../escaped.txt", {str(Path.cwd() / "escaped.txt")!r}):
            try:
                open(path, "w").write("x")
                print("wrote", path)
            except OSError as e:
                print("denied", path, type(e).__name__)
        """
    )
    assert r.ok, r.stderr
    assert "PRIVATE KEY" not in r.stdout and "read" not in r.stdout and "wrote" not in r.stdout, r.stdout
    assert not outside.exists() and not Path("/tmp/escaped.txt").exists()
    assert not (Path.cwd() / "escaped.txt").exists()


def test_the_callers_environment_is_not_inherited_or_readable(monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_API_KEY", "sk-do-not-leak")
    r = run(
        f"""
        import os
        print(sorted(os.environ))
        for pid in ({os.getpid()}, {os.getppid()}, 1):
            try:
                print(open(f"/proc/{{pid}}/environ").read()[:50])
            except OSError as e:
                print("denied", pid, type(e).__name__)
        """
    )
    assert r.ok, r.stderr
    assert "sk-do-not-leak" not in r.stdout and "ALIGN_TEST_API_KEY" not in r.stdout
    assert r.stdout.count("denied") == 3


def test_the_caller_cannot_be_signalled():
    r = run(
        f"""
        import os, signal
        try:
            os.kill({os.getpid()}, signal.SIGTERM)
            print("sent")
        except OSError as e:
            print("denied", type(e).__name__)
        """
    )
    assert r.ok and r.stdout.startswith("denied"), r.stdout + r.stderr


def test_output_is_capped():
    r = run("print('x' * 50_000_000)", file_mb=1, output_chars=1000)
    assert r.status == "output_limit"
    assert len(r.stdout) < 1100 and r.stdout.endswith("[output truncated]")


def test_uploaded_files_are_placed_in_the_directory_and_names_cannot_escape():
    r = run_python("print(open('data/in.csv').read())", Limits(), files={"data/in.csv": "a,b\n1,2\n"})
    assert r.ok and r.stdout == "a,b\n1,2\n\n"
    with pytest.raises(ValueError, match="leaves the sandbox"):
        run_python("print(1)", Limits(), files={"../../evil.py": "x"})


def test_a_required_guard_that_is_missing_refuses_to_run(monkeypatch):
    monkeypatch.setattr(sandbox, "_GUARDS", {"landlock": 0, "netns": True})
    with pytest.raises(SandboxUnavailable, match="landlock"):
        run_python("print(1)", Limits(require=("landlock",)))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to run as nobody")
def test_the_same_guards_hold_without_root():
    """The sandbox started by an unprivileged user (here `nobody`, with the system's Python, since the module uses
    only the standard library): user namespaces instead of root's, the process rlimit instead of a cgroup."""
    import tempfile

    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no system Python for an unprivileged user")
    here = Path(sandbox.__file__).parent
    for parent in [here, *here.parents]:
        if not os.stat(parent).st_mode & 0o001:
            pytest.skip(f"{parent} is closed to nobody")
    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(Path(sandbox.__file__).parent)!r})
            import sandbox
            g = sandbox.guards()
            lim = sandbox.Limits(cpu_s=1, wall_s=10, processes=8, memory_mb=256)
            out = {{"guards": g}}
            out["fork"] = sandbox.run_python(
                "import os, time\\nn = 0\\nfor _ in range(200):\\n    try:\\n        if os.fork() == 0:\\n"
                "            time.sleep(5); os._exit(0)\\n        n += 1\\n    except OSError:\\n        break\\nprint(n)",
                lim).stdout
            out["loop"] = sandbox.run_python("while True: pass", lim).status
            out["alloc"] = sandbox.run_python("bytearray(10 * 1024**3)", lim).status
            out["net"] = sandbox.run_python("import socket; socket.create_connection(('1.1.1.1', 80), 2)", lim).stderr
            out["write"] = sandbox.run_python("open('/tmp/nobody-escaped', 'w')", lim).stderr
            print(json.dumps(out))
            """
        )
    )
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not out["guards"]["root"] and out["guards"]["netns"] and out["guards"]["landlock"]
    assert int(out["fork"]) <= 8
    assert out["loop"] == "timeout" and out["alloc"] == "memory"
    assert "PermissionError" in out["net"] and "PermissionError" in out["write"]
    assert not Path("/tmp/nobody-escaped").exists()


def test_sigterm_to_the_launcher_kills_the_sandboxed_tree():
    """The launcher forwards its own end to the code (the init of its PID namespace): nothing survives it."""
    import tempfile
    import time

    work = Path(tempfile.mkdtemp())
    (work / "main.py").write_text("import time\ntime.sleep(60)\n")
    spec = {
        **Limits().__dict__,
        "workdir": str(work),
        "read_only": sandbox._read_only_paths(),
        "env": {"PATH": "/usr/bin:/bin"},
        "argv": ["main.py"],
        "require": [],
    }
    proc = subprocess.Popen([sys.executable, "-I", sandbox.__file__, "--launch", json.dumps(spec)], cwd=work)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) != 0
    time.sleep(0.3)
    survivors = [p for p in _processes() if b"main.py" in _cmdline(p)]
    assert not survivors
    sandbox._remove_cgroup(proc.pid)
    shutil.rmtree(work, ignore_errors=True)
