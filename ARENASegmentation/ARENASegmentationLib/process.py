"""The background worker ``python -m arenaseg.worker JOB.json`` as a child process.

Inside Slicer the command is ``PythonSlicer``: a launcher that runs the real interpreter as *its*
child and forwards stdin but no signal (CTK AppLauncher, ``QProcess::ForwardedInputChannel``).
So stopping the launcher does not stop training. Cancel is therefore cooperative, through stdin:
the worker runs with ``stop_on_stdin_eof`` and stops after the current step when its stdin
closes. As a safety net, a worker that has not exited ``graceSeconds`` later is killed with its
whole process tree (its own process group on Linux/macOS, ``taskkill /T`` on Windows).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

#: Workers of this process, stopped when Python exits (no orphan process).
RUNNING: set = set()

#: ``subprocess.CREATE_NO_WINDOW`` (Windows only; the constant does not exist elsewhere).
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)


def noConsoleWindow() -> dict:
    """Keyword arguments for ``subprocess.Popen``/``run`` that start a console program (the
    ``PythonSlicer`` launcher, ``taskkill``, pip) without a console window on Windows: the
    ``CREATE_NO_WINDOW`` creation flag, plus a hidden-window ``STARTUPINFO`` as Slicer's own
    ``launchConsoleProcess`` uses. Empty elsewhere (``creationflags`` is Windows-only)."""
    if os.name != "nt":
        return {}
    args = {"creationflags": CREATE_NO_WINDOW}
    startupInfo = getattr(subprocess, "STARTUPINFO", None)
    if startupInfo is not None:
        info = startupInfo()
        info.dwFlags |= getattr(subprocess, "STARTF_USESHOWWINDOW", 1)
        info.wShowWindow = 0  # SW_HIDE
        args["startupinfo"] = info
    return args


def killProcessTree(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process it started (launcher, interpreter, data loaders)."""
    if os.name == "nt":  # taskkill is a console program: no window may flash
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False,
                       **noConsoleWindow())
        return
    try:  # the worker leads its own session: its group holds the launcher and all its children
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class WorkerProcess:
    """One worker process, read without blocking.

    A daemon thread reads the JSON lines of the child's stdout (UTF-8; undecodable bytes are
    replaced) into a queue and always ends with an ``exit`` event; :meth:`events` drains that
    queue and never waits, so the caller (a Qt timer, a loop in tests) stays in control. stderr
    goes to a log file, whose tail explains a crash.
    """

    def __init__(self, args: list, env: dict, logPath: Path, graceSeconds: float = 5.0):
        self.logPath = logPath
        self.graceSeconds = graceSeconds
        self._log = open(logPath, "wb")
        popenArgs = {}
        if os.name == "nt":  # no console window for the launcher or the interpreter it starts
            popenArgs.update(noConsoleWindow())
        else:  # own process group, so that the safety net reaches the launcher's children
            popenArgs["start_new_session"] = True
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        env=env, **popenArgs)
        self._queue = queue.Queue()
        self.readerThread = threading.Thread(target=self._read, daemon=True)
        self.readerThread.start()
        self.cancelRequested = None  # time.monotonic() of the cancel request
        self.killed = False
        RUNNING.add(self)

    def _read(self) -> None:
        try:
            for raw in self.process.stdout:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                # a stray print in the child: logged by the reading (main) thread
                self._queue.put(event if isinstance(event, dict) else {"event": "log", "line": line})
        except Exception as err:  # noqa: BLE001 - the panel must never wait forever
            self._queue.put({"event": "log", "line": f"reading the worker's output failed: {err}"})
        finally:
            self._queue.put({"event": "exit", "returncode": self.process.wait()})

    def events(self) -> list:
        """Every event received since the last call (possibly none); ends with ``exit``."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if self.cancelRequested and self.process.poll() is None and \
                time.monotonic() - self.cancelRequested > self.graceSeconds:
            self.kill()
        return out

    def cancel(self) -> None:
        """Ask the worker to stop after its current step: close its stdin (see module doc)."""
        if self.cancelRequested is None:
            self.cancelRequested = time.monotonic()
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def kill(self) -> None:
        """Safety net: end the whole process tree now."""
        if not self.killed:
            self.killed = True
            logging.warning(f"ARENA: worker {self.process.pid} did not stop in {self.graceSeconds} s: killed")
            killProcessTree(self.process)

    def stop(self, timeout: float | None = None) -> int:
        """Cancel, wait up to ``timeout`` (default: the grace time), kill the tree if needed;
        returns the exit code. Blocks: for scene close and application exit."""
        self.cancel()
        try:
            return self.process.wait(self.graceSeconds if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def logTail(self, lines: int = 15) -> str:
        """The last lines of the worker's stderr, which is UTF-8 (PYTHONIOENCODING): not the
        locale's encoding, which is cp1252 or similar on Windows."""
        self._log.flush()
        try:
            return "\n".join(self.logPath.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        RUNNING.discard(self)
        self._log.close()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


def stopAll() -> None:
    """Stop every worker of this process (registered with ``atexit`` by the module)."""
    for worker in list(RUNNING):
        if worker.process.poll() is None:
            worker.stop()
