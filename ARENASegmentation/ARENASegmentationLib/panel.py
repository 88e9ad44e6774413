"""The panel's decisions as plain functions (tested without Qt); the Widget only applies them."""

from __future__ import annotations


def segmentSelection(stored: str, shown: str, exists) -> str:
    """The segment ID the parameter node should hold.

    The selector shows a segment (its first one, when the user painted before opening the module)
    but restores its selection with signals blocked, so the parameter stays empty and nothing is
    emitted: read what the selector shows whenever the stored ID is empty or gone.

    Args:
        stored: ID in the parameter node ("" when none).
        shown: ID the selector currently shows ("" when none).
        exists: ``exists(segmentId) -> bool`` for the selected segmentation.
    """
    if stored and exists(stored):
        return stored
    return shown if shown and exists(shown) else ""


def segmentIdsForSegmentation(owner: str, newNodeId: str, target: str, background: str) -> tuple:
    """(target, background) segment IDs after the segmentation selector changed: kept only when
    the IDs were chosen in that very segmentation (``owner``, its node ID, "" when unknown);
    an ID such as "Segment_2" names another segment in another segmentation."""
    return (target, background) if owner and owner == newNodeId else ("", "")


def segmentAfterSelectorChange(stored: str, picked: str, exists) -> str:
    """The segment ID to store when a segment selector emits ``picked``.

    When the stored segment was deleted, Slicer's selector moves on to another segment by itself
    and emits it: that is not the user's choice (a segment taken as "known background" by
    accident would clear the result inside it), so the choice is cleared instead."""
    if stored and picked and picked != stored and not exists(stored):
        return ""
    return picked


def applyButtonState(running: bool, installing: bool, ready: bool, problem: str = "") -> tuple:
    """(text, enabled, tooltip) of the panel's main button: open the ARENA effect, or *Cancel*."""
    label = "Segment with ARENA in the Segment Editor"
    if running:
        return "Cancel", True, "Stop the background process; the segmentation stays as it is"
    if installing:
        return "Installing...", False, "Installing the Python packages ARENA needs"
    if problem:
        return label, False, problem
    if not ready:
        return label, False, "Select the CT volume, the segmentation and the painted target segment"
    return label, True, ("Open the ARENA effect on the painted segment: it adapts the backbone to the "
                         "painted slices and previews the whole structure; Apply commits it (Ctrl+Z undoes it)")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progressText(event: dict, elapsed: float, device: str = "", server: str = "") -> str:
    """Status-bar line for a ``progress`` event: step, where it runs, loss, rank, elapsed and
    estimated time left (steps so far at their mean rate)."""
    step, steps = event["step"], event["steps"]
    text = f"ARENA step {step}/{steps}"
    if server or device:
        text += " " + whereText(server, device)
    text += f": loss {event['loss']:.3f}, effective rank {event['total_rank']}, {_clock(elapsed)} elapsed"
    if step > 0 and steps > step:
        text += f", about {_clock(elapsed / step * (steps - step))} left"
    return text


def whereText(server: str = "", device: str = "") -> str:
    """Where a job runs, for the panel: "on server URL (cuda)" or "on this computer (cpu)";
    the device is left out until the worker has reported it."""
    place = f"on server {server}" if server else "on this computer"
    return f"{place} ({device})" if device else place


def serverUrlProblem(url: str) -> str:
    """Why ``url`` cannot name an ``arenaseg serve`` server ("" when it can, or when empty:
    empty means the local worker)."""
    from urllib.parse import urlsplit

    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (f"ARENA server URL '{url}' is not an http:// or https:// address: enter e.g. "
                "https://gpu.example.org:8765 in the module's Server settings, or clear it to run on "
                "this computer.")
    return ""


def serverToken(tokenFile: str, environment: dict) -> str:
    """The token for the server: the first line of ``tokenFile``, else ``ARENASEG_TOKEN`` in
    ``environment``.

    Raises:
        RuntimeError: no token, or a token file that cannot be read or is empty (one line: the
            file, the cause, the fix).
    """
    where = "choose the file holding your token in the module's Server settings"
    if tokenFile:
        try:
            with open(tokenFile, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise RuntimeError(f"ARENA server token file '{tokenFile}' cannot be read "
                               f"({getattr(err, 'strerror', None) or err}): {where}.") from None
        if not token:
            raise RuntimeError(f"ARENA server token file '{tokenFile}' is empty: {where}.")
        return token
    token = (environment.get("ARENASEG_TOKEN") or "").strip()
    if not token:
        raise RuntimeError(f"An ARENA server is set but no token: {where} (the server's administrator "
                           "creates the token with 'arenaseg token add'), or clear the server URL to run "
                           "on this computer.")
    return token


def phaseText(event: dict) -> str:
    """Status line for a ``phase`` event; a long phase adds its progress: a download in MB and
    per cent, the inference windows as a count."""
    text = event.get("message") or event.get("phase", "")
    done, total = event.get("done"), event.get("total")
    if done is None or not total:
        return text
    if event.get("phase") == "downloading":
        return f"{text}: {done / 2**20:.1f} of {total / 2**20:.1f} MB ({100 * done / total:.0f} %)"
    return f"{text} {done}/{total}"


def availableMemoryGB():
    """Memory the system can still give a new process, in GB (Linux ``MemAvailable``, Windows
    ``GlobalMemoryStatusEx``); None where it cannot be read."""
    import os
    import sys

    try:
        if sys.platform.startswith("linux"):
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) / 2**20
        elif os.name == "nt":
            import ctypes

            class Status(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                            ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

            status = Status(dwLength=ctypes.sizeof(Status))
            if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                return status.ullAvailPhys / 2**30
    except (OSError, ValueError, AttributeError):
        pass
    return None


def memoryAdvice(backbone: str, needGB, availableGB, fallback: str, fallbackGB) -> str:
    """A sentence when ``availableGB`` is below what one run on ``backbone`` needs on the CPU
    (``needGB``, measured: ``BackboneSpec.memory_gb``), with the way out; "" otherwise."""
    if needGB is None or availableGB is None or availableGB >= needGB:
        return ""
    advice = f"Only {availableGB:.1f} GB of memory is free and '{backbone}' needs about {needGB:.1f} GB on the CPU: "
    if fallback != backbone and fallbackGB is not None and availableGB >= fallbackGB:
        return advice + f"close other programs, or choose the backbone '{fallback}' ({fallbackGB:.1f} GB) in the module's settings."
    return advice + "close other programs (Slicer's own scene included) before adapting."


def deviceNotice(requested: str, device: str, server: str = "") -> str:
    """A sentence when the worker runs on the CPU although a GPU may have been wanted ("" else;
    nothing for a job on a server: this computer's PyTorch is not the cause there).
    The worker reports its device: the module never imports torch in Slicer's process."""
    if device and device.startswith("cpu") and requested == "auto" and not server:
        return ("No usable CUDA GPU (or the CPU build of PyTorch): ARENA runs on the CPU, about a minute "
                "per run with the default backbone (the small backbone is faster, less accurate on new "
                "patients). See Troubleshooting, 'CUDA', in the README.")
    return ""
