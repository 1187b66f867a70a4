"""The code interpreter: a stateful Python session per conversation, an IPython kernel in the sandbox.

The kernel (`ipykernel`, driven through `jupyter_client`) runs under the same launcher as benchmark code
(`align/core/sandbox.py`): its own directory as the only place it can write (Landlock), no network (a new network
namespace, and no TCP under Landlock), no privileges, a process limit, an address-space limit, a CPU budget for the
whole session, and a clean environment. It talks to us over ZeroMQ on Unix sockets inside that directory (the IPC
transport), since it has no network to listen on.

`run(code)` executes a cell and returns its text (stdout, stderr, the result, the error), the figures it drew
(saved as PNG files in `figures/`) and the files it left. A cell that runs past its time is interrupted (SIGINT,
the session keeps its state); one that does not stop is killed and the session restarted (its state lost, said so).
Files the user uploads are placed in the directory before the kernel starts (`files=`) or at any time (`upload`).
"""

from __future__ import annotations

import base64
import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.core.sandbox import Limits, give_to_sandbox, release, start_process

SESSION_LIMITS = Limits(cpu_s=600, wall_s=3600, memory_mb=4096, file_mb=64, processes=64, open_files=512)


@dataclass
class CellResult:
    text: str  # what the cell printed, returned and raised, as the model will read it
    status: str  # ok | error | timeout | restarted
    figures: list[str] = field(default_factory=list)  # PNG files (relative to the session's directory)
    files: list[str] = field(default_factory=list)  # every file in the directory after the cell
    seconds: float = 0.0

    def observation(self) -> str:
        parts = [self.text.rstrip()] if self.text.strip() else []
        parts += [f"[figure saved: {f}]" for f in self.figures]
        return "\n".join(parts) or "[no output]"


class InterpreterError(RuntimeError):
    pass


class CodeInterpreter:
    def __init__(
        self,
        workdir: str | Path | None = None,
        limits: Limits = SESSION_LIMITS,
        files: dict[str, bytes | str] | None = None,
        output_chars: int = 8000,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.own_dir = workdir is None
        self.work = Path(tempfile.mkdtemp(prefix="align-interpreter-") if workdir is None else workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.limits, self.output_chars, self.start_timeout_s = limits, output_chars, start_timeout_s
        self.figure_count = 0
        self.proc: subprocess.Popen | None = None
        self.client = None
        for name, content in (files or {}).items():
            self.upload(name, content)
        self._start()

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        from jupyter_client import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        run = self.work / ".kernel"
        if run.exists():
            shutil.rmtree(run)
        run.mkdir()
        conn, _ = write_connection_file(
            fname=str(run / "connection.json"),
            ip=str(run / "ipc"),
            transport="ipc",
            key=secrets.token_hex(16).encode(),
        )
        self.log = open(run.parent / ".kernel.log", "wb")  # noqa: SIM115 - closed in close()
        argv = [
            "-m",
            "ipykernel_launcher",
            "-f",
            conn,
            "--HistoryManager.enabled=False",
            "--IPKernelApp.no_stdout=False",
        ]
        for attempt in (1, 2):  # a kernel that dies silently at start on a loaded machine is started once more
            self.proc = start_process(argv, self.limits, self.work, stdout=self.log, stderr=subprocess.STDOUT)
            client = BlockingKernelClient()
            client.load_connection_file(conn)
            client.start_channels()
            try:
                client.wait_for_ready(timeout=self.start_timeout_s)
                break
            except RuntimeError as e:
                client.stop_channels()
                self._kill(keep_log=attempt == 1)
                tail = (run.parent / ".kernel.log").read_text(errors="replace")[-1500:]
                if attempt == 2 or tail.strip():  # a kernel that said why it died would only die again
                    if attempt == 1:
                        self.log.close()
                    raise InterpreterError(f"the code interpreter's kernel did not start: {e}\n{tail}") from None
        self.client = client
        self.execute("%matplotlib inline", timeout_s=self.start_timeout_s)

    def _kill(self, keep_log: bool = False) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            release(self.proc)
            self.proc = None
        if getattr(self, "log", None) and not keep_log:
            self.log.close()

    def close(self) -> None:
        self._kill()
        if self.own_dir:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, name: str, content: bytes | str) -> Path:
        target = (self.work / name).resolve()
        if self.work not in target.parents:
            raise ValueError(f"file name {name!r} leaves the interpreter's directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        if self.proc is not None:  # the running kernel's user (a kernel yet to start is given the folder then)
            give_to_sandbox(self.work, self.proc.sandbox_uid)
        return target

    # ------------------------------------------------------------------------------------------------ execution
    def execute(self, code: str, timeout_s: float = 30.0) -> CellResult:
        if self.client is None:
            raise InterpreterError("the session is closed")
        start = time.monotonic()
        out: list[str] = []
        figures: list[str] = []
        status = "ok"

        def hook(msg: dict) -> None:
            nonlocal status
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                if "image/png" in data:
                    self.figure_count += 1
                    path = Path("figures") / f"figure-{self.figure_count}.png"
                    (self.work / path).parent.mkdir(exist_ok=True)
                    (self.work / path).write_bytes(base64.b64decode(data["image/png"]))
                    figures.append(str(path))
                elif "text/plain" in data:
                    out.append(data["text/plain"] + "\n")
            elif kind == "error":
                status = "error"
                out.append(f"{content['ename']}: {content['evalue']}\n")

        msg_id = self.client.execute(code, allow_stdin=False)
        deadline = start + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:  # died: memory, CPU budget, os._exit
                status = "restarted"
                out.append("[the interpreter stopped (a limit was reached or it exited); a new session was started "
                           "and its variables are gone]")  # fmt: skip
                self._kill()
                self._start()
                break
            if time.monotonic() > deadline:
                status = self._interrupt()
                out.append(
                    f"[stopped after {timeout_s:.0f} s"
                    + ("; the session was restarted and its variables are gone]" if status == "restarted" else "]")
                )
                break
            try:
                msg = self.client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["header"]["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                break
            hook(msg)
        text = "".join(out)
        if len(text) > self.output_chars:
            text = text[: self.output_chars] + "\n[output truncated]"
        files = sorted(
            str(p.relative_to(self.work))
            for p in self.work.rglob("*")
            if p.is_file() and not str(p.relative_to(self.work)).startswith(".")
        )
        return CellResult(text, status, figures, files, time.monotonic() - start)

    def _interrupt(self) -> str:
        """SIGINT to the launcher, which hands it to the kernel (a KeyboardInterrupt in the cell); if the kernel
        is still busy a few seconds later, it is killed and a new session started."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["header"]["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                return "timeout"
        self._kill()
        self._start()
        return "restarted"
