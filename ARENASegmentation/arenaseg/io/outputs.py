"""Output files: checked writable before any work, verified before they are published.

A write that fails must never look like success. Writers do not all say when they fail:
SimpleITK's NIfTI writer reports a short write (full disk) only on stderr and returns normally,
leaving a truncated file that still opens as an image. So every output goes through
:class:`Outputs`:

- before any work, :func:`check_writable` creates, writes and removes a small file in the
  output folder, the only test that sees read-only mounts, ACLs, immutable folders and full
  disks exactly as the real write will;
- each file is written into a hidden temporary folder beside its destination, flushed to disk,
  and read back and compared with what was meant to be written (the caller's ``verify``);
- only when every file of the job passed are they moved into place (atomic renames); on any
  failure or interruption the temporary folders are removed and nothing is published.

Every failure becomes one :class:`~arenaseg.errors.ArenaError` line naming the file, the cause
(e.g. "no space left on device") and the fix.

Creating, publishing and removing the temporary folders happens with SIGINT and SIGTERM held
back (delivered right after), so an interruption at any moment leaves either every output of the
job or none, and never a temporary folder.

Paths that are not UTF-8 (a Latin-1 folder "M\\xfcller" on Linux, which Python holds as a ``str``
with surrogate escapes): SimpleITK/ITK and safetensors take paths as UTF-8 and abort the whole
process (SimpleITK) or fail on them, so no such path ever reaches them. An output is written and
verified through an ASCII alias (a symbolic link to its temporary folder in the system's
temporary folder) and renamed into place with the operating system's own calls, which take any
bytes; an input is read through :class:`ReadablePaths`, the same kind of alias. Messages show
such a path with its bytes escaped (:func:`shown`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import ArenaError, Cancelled


class WriteMismatch(Exception):
    """The file read back is not what was meant to be written (raised by ``verify`` functions)."""


# Errors a failing write raises: the OS's own, SimpleITK's (RuntimeError), a verification's.
WRITE_ERRORS = (OSError, RuntimeError, WriteMismatch)

# OS causes a writer's message may name in words instead of an errno (SimpleITK, safetensors).
_CAUSES = tuple(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG,
                                  errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO) if code)
_SPACE_FIX = {errno.ENOSPC: "free space on that disk",
              getattr(errno, "EDQUOT", -1): "free space within your disk quota",
              errno.EFBIG: "raise the file-size limit (ulimit -f)"}
# Below this many free bytes after a failed write, the disk is taken as the cause: a short write
# uses up what was left, so a full disk shows (almost) nothing free.
_NEARLY_FULL = 1 << 20


def utf8_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is valid UTF-8, as SimpleITK, ITK and safetensors need (a path with
    other bytes is a ``str`` with surrogate escapes in Python, which aborts SimpleITK)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str | os.PathLike) -> str:
    """``path`` as a message shows it: bytes that are not UTF-8 escaped (``M\\xfcller``)."""
    text = os.fspath(path)
    return text if utf8_path(text) else os.fsencode(text).decode("utf-8", "backslashreplace")


def _ascii_name(name: str) -> str:
    """``name`` with every byte that is not printable ASCII replaced by ``_`` (suffix kept)."""
    return "".join(c if " " < c < "\x7f" and c not in "/\\" else "_"
                   for c in os.fsencode(name).decode("latin-1")) or "_"


def _alias_folder(prefix: str) -> str:
    """A new private folder for aliases in the system's temporary folder."""
    folder = tempfile.mkdtemp(prefix=prefix)
    if not utf8_path(folder):
        shutil.rmtree(folder, ignore_errors=True)
        raise ArenaError(f"the temporary folder '{shown(tempfile.gettempdir())}' is not a UTF-8 "
                         "path, which the image libraries need: set TMPDIR to a folder whose name "
                         "has only UTF-8 characters")
    return folder


_holding = 0  # depth of signals_held blocks (signal handlers run in the main thread only)
_deferred: list[BaseException] = []


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back in this block, so a cancel cannot cut a step that must
    finish (creating a temporary folder and recording it, publishing, removing); a signal that
    came meanwhile takes effect right after the block. The signal mask (POSIX) holds it back from
    this thread; another thread (PyTorch's, BLAS's) may still take it, and Python then runs the
    handler here at once: handlers call :func:`interrupt`, which waits for the block's end."""
    global _holding
    mask = getattr(signal, "pthread_sigmask", None)
    old = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if mask else None
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if mask:
            mask(signal.SIG_SETMASK, old)
        if not _holding and _deferred:
            raise _deferred.pop()


@contextlib.contextmanager
def interrupts_not_lost():
    """Within this block, an interrupt that a signal handler raised inside a finalizer (tqdm's
    ``__del__`` as the outputs are written), which Python reports as 'Exception ignored' and
    drops, is kept and raised when the block ends instead: the run ends as interrupted, not as if
    nothing came (``sys.unraisablehook``; other reports go on to the previous hook)."""
    lost: list[BaseException] = []

    def keep(info) -> None:
        if isinstance(info.exc_value, (KeyboardInterrupt, Cancelled)):
            lost.append(info.exc_value)
        else:
            previous(info)

    previous, sys.unraisablehook = sys.unraisablehook, keep
    try:
        yield
    finally:
        sys.unraisablehook = previous
    if lost:
        raise lost[0]


def interrupt(exception: BaseException) -> None:
    """For signal handlers: raise ``exception`` now, or, inside :func:`signals_held`, when the
    outermost block ends."""
    if _holding:
        _deferred[:] = [exception]
        return
    raise exception


class ReadablePaths:
    """Input paths that SimpleITK, ITK and safetensors can open: a file path that is not UTF-8
    is replaced by an ASCII alias in a private temporary folder, a symbolic link to its folder (so
    the files a header names, e.g. the data file of a ``.nhdr``, resolve beside it) or, when the
    name itself is not UTF-8, to the file itself; a folder (DICOM) whose path or any of whose
    file names is not UTF-8 (the libraries list a folder themselves) by a folder of links to its
    files, with ASCII names. :meth:`explain` puts the paths the user gave back into a message;
    :meth:`close` removes the aliases (never what they point to).
    """

    def __init__(self) -> None:
        self.folder: str | None = None
        self.aliases: dict[str, str] = {}  # alias → the path as the user gave it

    def __enter__(self) -> "ReadablePaths":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _slot(self) -> str:
        with signals_held():
            if self.folder is None:
                self.folder = _alias_folder("arenaseg-inputs-")
        slot = os.path.join(self.folder, str(len(self.aliases)))
        os.mkdir(slot)
        return slot

    def __call__(self, path, option: str = "input"):
        """``path`` itself when the libraries can open it (or None), else its alias."""
        if path is None:
            return path
        path = os.fspath(path)
        full = os.path.abspath(path)
        parent, name = os.path.split(full)
        if os.path.isdir(full):
            try:
                entries = os.listdir(full)
            except OSError:
                return path  # the reader says why it cannot be read
            if utf8_path(full) and all(map(utf8_path, entries)):
                return path
            alias = os.path.join(self._slot(), _ascii_name(name))
            os.mkdir(alias)
            self.aliases[alias] = path
            for entry in sorted(entries):
                if not os.path.isfile(os.path.join(full, entry)):
                    continue  # the libraries read the files of a folder, not its subfolders
                link = os.path.join(alias, entry if utf8_path(entry) else _ascii_name(entry))
                while os.path.lexists(link):
                    link = os.path.join(alias, "_" + os.path.basename(link))
                os.symlink(os.path.join(full, entry), link)
                if not utf8_path(entry):
                    self.aliases[link] = os.path.join(path, entry)
            return alias
        if utf8_path(full):
            return path
        if utf8_path(name):
            slot = os.path.join(self._slot(), "folder")
            os.symlink(parent, slot)
            alias = os.path.join(slot, name)
        else:
            alias = os.path.join(self._slot(), _ascii_name(name))
            os.symlink(full, alias)
        self.aliases[alias] = path
        return alias

    def explain(self, text: str) -> str:
        """``text`` with every alias replaced by the path the user gave (shown escaped)."""
        for alias, path in sorted(self.aliases.items(), key=lambda a: -len(a[0])):
            text = text.replace(alias, shown(path))
        return text

    def close(self) -> None:
        with signals_held():
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)  # removes links, not their targets
            self.folder = None


#: Every output this process published (:meth:`Outputs.publish`), e.g. for an interruption's
#: message after the outputs were already in place.
PUBLISHED: list[Path] = []


def _cause_code(err: BaseException | None) -> int | None:
    """The OS error behind ``err``: its errno, or one its message names ("os error 28" from
    safetensors, "No space left on device" from SimpleITK)."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    text = str(err or "")
    found = re.search(r"os error (\d+)", text)
    if found:
        return int(found.group(1))
    return next((code for code in _CAUSES if os.strerror(code).lower() in text.lower()), None)


def _file_size_limit() -> int | None:
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _diagnose(err: BaseException, folder: Path, stage: Path | None, printed: str = "") -> int | None:
    """The errno of a failed write: named by the error or by what the writer printed; for
    writers that do not say (a short write only noticed by the verification), read from the
    state the write left: a file at the file-size limit, or a disk with nothing left."""
    code = _cause_code(err) or _cause_code(RuntimeError(printed))
    if code:
        return code
    limit = _file_size_limit()
    if limit is not None and stage is not None and stage.is_dir():
        if any(f.stat().st_size >= limit for f in stage.iterdir() if f.is_file()):
            return errno.EFBIG
    try:
        if shutil.disk_usage(folder).free < _NEARLY_FULL:
            return errno.ENOSPC
    except OSError:
        pass
    return None


def _fix(code: int | None, option: str | None) -> str:
    where = f"choose another folder for {option}" if option else "choose another folder"
    if code in _SPACE_FIX:
        return f"{_SPACE_FIX[code]} or {where}"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make the folder writable or {where}"
    return f"check the disk and the folder, or {where}"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown reason"


def check_name_length(path: str | os.PathLike, what: str = "output", option: str | None = None) -> None:
    """Refuse a file name longer than its file system allows (``NAME_MAX``, 255 bytes on most),
    which would otherwise show as a folder that cannot be written.

    Raises:
        ArenaError: the name's length in bytes, the limit, and the fix.
    """
    def exists(p: Path) -> bool:
        try:
            return p.exists()
        except OSError:  # a name too long for the file system
            return False

    path = Path(path)
    missing = [path] + list(itertools.takewhile(lambda p: not exists(p), path.parents))
    folder = path.parents[len(missing) - 1]
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf; 255 there too
        limit = 255
    for part in (p.name for p in missing):
        size = len(os.fsencode(part))
        if size > limit:
            where = f" for {option}" if option else ""
            raise ArenaError(f"{what} '{shown(path)}': the name '{shown(part[:40])}…' is {size} "
                             f"bytes long, and the file system of '{shown(folder)}' allows {limit}: "
                             f"choose a shorter name{where}")


def check_writable(path: str | os.PathLike, what: str = "output", option: str | None = None) -> Path:
    """Show before any work that ``path`` can be written: create a small temporary file in its
    folder (the nearest existing one: missing folders are created when writing), write and flush
    a byte, remove it.

    Raises:
        ArenaError: ``path`` is a folder, or the folder cannot be written (read-only, no
            permission, full disk, ...).
    """
    path = Path(path)
    check_name_length(path, what, option)
    if path.is_dir():
        raise ArenaError(f"{what} '{shown(path)}' is a folder: give a file name in it, e.g. "
                         f"'{shown(path / 'result')}' with the right extension")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with signals_held():  # an interruption cannot leave the probe behind
            fd, probe = tempfile.mkstemp(prefix=f".{path.name[:32]}.", suffix=".probe", dir=folder)
            try:
                os.write(fd, b"\0")
                os.fsync(fd)  # some file systems (NFS, quotas) only refuse when data reaches the disk
            finally:
                os.close(fd)
                os.unlink(probe)
    except OSError as err:
        cause = os.strerror(err.errno).lower() if err.errno else _one_line(err)
        raise ArenaError(f"{what} '{shown(path)}' cannot be written ({cause} in '{shown(folder)}'): "
                         f"{_fix(err.errno, option)}") from None
    return path


@contextlib.contextmanager
def captured_stderr():
    """Collect what C/C++ libraries print on file descriptor 2 while writing (SimpleITK's NIfTI
    writer reports a short write only there), so that a failure stays one line and the text can
    explain it. Yields a list that receives the text; on success the caller prints it again."""
    text: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (a GUI without a console)
        yield text
        return
    try:
        with signals_held():  # without O_TMPFILE it is a named file until unlinked: not cut there
            sink = tempfile.TemporaryFile()
    except OSError:  # no room for it either: let the library print as usual
        os.close(saved)
        yield text
        return
    with sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def _flush_to_disk(folder: Path) -> None:
    """fsync every file in ``folder``: errors some file systems (NFS, ext4 delayed allocation)
    only report when the data reaches the disk surface here, not after the rename."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Outputs:
    """The output files of one job, all or nothing (see the module doc).

    Use as a context manager: :meth:`write` each file, then :meth:`publish`; leaving the block
    without publishing (an error, Ctrl-C, SIGTERM) removes every temporary file.
    """

    def __init__(self) -> None:
        # (destination, temporary folder, what, option, alias folder or None, staged file name)
        self._staged: list[tuple[Path, Path, str, str | None, str | None, str]] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def write(self, path: str | os.PathLike, write: Callable[[str], None],
              verify: Callable[[str], None] | None = None, what: str = "output",
              option: str | None = None) -> Path:
        """Call ``write(temporary_path)``, flush it to disk and ``verify(temporary_path)``
        (raise :class:`WriteMismatch` when the file is not what was meant).

        The temporary file has ``path``'s name, in a hidden folder beside it, so the format
        follows the extension and formats with a separate data file (``.nhdr``, ``.mhd``) name
        it right. A path that is not UTF-8 is handed to ``write`` and ``verify`` through an
        ASCII alias of that folder (and an ASCII file name with the same extension when the name
        itself is not UTF-8), see the module doc. Returns the temporary path (the file lies
        there until :meth:`publish`).

        Raises:
            ArenaError: the write or the verification failed (file, cause, fix); nothing of
                this job will be published.
        """
        path = Path(path)
        name = path.name if utf8_path(path.name) else _ascii_name(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with signals_held():  # the folder is recorded as soon as it exists
                stage = Path(tempfile.mkdtemp(prefix=f".{path.name[:32]}.", dir=path.parent))
                self._staged.append((path, stage, what, option, None, name))
            alias = None
            if not utf8_path(stage):
                with signals_held():
                    alias = _alias_folder("arenaseg-outputs-")
                    self._staged[-1] = (path, stage, what, option, alias, name)
                os.symlink(stage, os.path.join(alias, "stage"))
        except OSError as err:
            self.discard()
            raise self._error(path, err, None, what, option) from None
        except ArenaError:
            self.discard()
            raise
        target = stage / name
        given = Path(alias) / "stage" / name if alias else target  # what the libraries see
        with captured_stderr() as printed:
            try:
                write(str(given))
                if not target.is_file():
                    raise WriteMismatch("the writer made no file")
                _flush_to_disk(stage)
                if target.stat().st_size == 0:
                    raise WriteMismatch("the file is empty")
                if verify is not None:
                    verify(str(given))
                failure = None
            except WRITE_ERRORS as err:
                failure = err
        if failure is None:
            if printed and printed[0]:
                sys.stderr.write(printed[0])  # warnings of a write that worked stay visible
            return target
        error = self._error(path, failure, stage, what, option, "".join(printed), given)
        self.discard()
        raise error from None

    def _error(self, path: Path, err: BaseException, stage: Path | None, what: str,
               option: str | None, printed: str = "", target: Path | None = None) -> ArenaError:
        code = _diagnose(err, path.parent, stage, printed)
        if code:
            cause = os.strerror(code).lower()
        else:
            detail = _one_line(printed) if isinstance(err, WriteMismatch) and printed.strip() else ""
            cause = _one_line(err) + (f"; {detail}" if detail else "")
            if target is not None:  # name the file the user asked for, not our temporary one
                cause = cause.replace(str(target), shown(path))
        return ArenaError(f"{what} '{shown(path)}' could not be written ({shown(cause)}), so "
                          f"nothing was saved: {_fix(code, option)}")

    def temporary(self, path: str | os.PathLike) -> Path:
        """Where the written, verified file for ``path`` lies until :meth:`publish`."""
        return next(stage / name for dest, stage, _, _, _, name in self._staged
                    if dest == Path(path))

    def publish(self) -> list[Path]:
        """Move every verified file into place (atomic renames; a separate data file before the
        header that names it) and return the destination paths. SIGINT and SIGTERM wait until
        every file is in place (or none is)."""
        done: list[Path] = []
        with signals_held():
            try:
                for path, stage, what, option, alias, name in self._staged:
                    files = sorted(stage.iterdir(), key=lambda f: f.name == name)
                    try:
                        for f in files:
                            os.replace(f, path if f.name == name else path.parent / f.name)
                    except OSError as err:
                        # Renames within a folder we just wrote in fail only when something
                        # else changed it meanwhile; take back what this job published, all or
                        # nothing.
                        for p in done:
                            p.unlink(missing_ok=True)
                        raise self._error(path, err, None, what, option) from None
                    done.append(path)
            finally:
                self.discard()
            PUBLISHED.extend(done)
        return done

    def discard(self) -> None:
        """Remove every temporary folder (and alias) that was not published."""
        with signals_held():
            for _, stage, _, _, alias, _ in self._staged:
                shutil.rmtree(stage, ignore_errors=True)
                if alias:
                    shutil.rmtree(alias, ignore_errors=True)
            self._staged = []


def atomic_write(path: str | os.PathLike, write: Callable[[str], None],
                 verify: Callable[[str], None] | None = None, what: str = "output",
                 option: str | None = None, outputs: Outputs | None = None) -> Path:
    """Write one file through :class:`Outputs`: into ``outputs`` when given (published with the
    job's other files), else on its own and published at once. Returns ``path``.

    Raises:
        ArenaError: the write or its verification failed; nothing was published.
    """
    if outputs is not None:
        outputs.write(path, write, verify, what, option)
        return Path(path)
    with Outputs() as single:
        single.write(path, write, verify, what, option)
        return single.publish()[0]


def write_text(path: str | os.PathLike, text: str, what: str = "output",
               option: str | None = None, outputs: Outputs | None = None) -> Path:
    """Write ``text`` (UTF-8; bytes of a path that is not UTF-8, held as surrogate escapes, are
    written escaped, ``\\xfc``) and check it reads back the same."""
    data = text.encode("utf-8", "backslashreplace")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    def verify(tmp: str) -> None:
        with open(tmp, "rb") as f:
            if f.read() != data:
                raise WriteMismatch("the text read back differs from what was written")

    return atomic_write(path, write, verify, what, option, outputs)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str],
                      what: str = "output", option: str | None = None,
                      outputs: Outputs | None = None) -> Path:
    """Write ``tensors`` and header ``metadata`` as safetensors, then re-open the file with
    safetensors and check every tensor (name, dtype, shape, values) and the metadata."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save

    # Serialise in memory and write the bytes here, so a failing write raises an OSError that
    # names its errno (the library's own file writer reports it only inside its message).
    data = save(tensors, metadata=metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    def verify(tmp: str) -> None:
        try:
            with safe_open(tmp, framework="pt") as f:
                meta = f.metadata() or {}
            back = load_file(tmp)
        except SafetensorError as err:
            raise WriteMismatch(f"the file does not read back as safetensors ({err})") from None
        if meta != metadata or back.keys() != tensors.keys() or not all(
                back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t.cpu())
                for k, t in tensors.items()):
            raise WriteMismatch("the tensors read back differ from what was written")

    return atomic_write(path, write, verify, what, option, outputs)


__all__ = ["Outputs", "PUBLISHED", "ReadablePaths", "WriteMismatch", "atomic_write",
           "captured_stderr", "check_writable", "interrupt", "shown", "signals_held", "utf8_path",
           "write_safetensors", "write_text"]
