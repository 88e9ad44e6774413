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


def applyButtonState(running: bool, installing: bool, ready: bool, problem: str = "") -> tuple:
    """(text, enabled, tooltip) of the *Adapt and segment* / *Cancel* button."""
    if running:
        return "Cancel", True, "Stop the background process; the segmentation stays as it is"
    if installing:
        return "Installing...", False, "Installing the Python packages ARENA needs"
    if problem:
        return "Adapt and segment", False, problem
    if not ready:
        return "Adapt and segment", False, "Select the CT volume, the segmentation and the painted target segment"
    return "Adapt and segment", True, "Adapt the backbone to the painted slices and segment the whole volume"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progressText(event: dict, elapsed: float, device: str = "") -> str:
    """Status-bar line for a ``progress`` event: step, loss, rank, elapsed and estimated time left
    (steps so far at their mean rate)."""
    step, steps = event["step"], event["steps"]
    text = f"ARENA step {step}/{steps}"
    if device:
        text += f" on {device}"
    text += f": loss {event['loss']:.3f}, effective rank {event['total_rank']}, {_clock(elapsed)} elapsed"
    if step > 0 and steps > step:
        text += f", about {_clock(elapsed / step * (steps - step))} left"
    return text


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


def deviceNotice(requested: str, device: str) -> str:
    """A sentence when the worker runs on the CPU although a GPU may have been wanted ("" else).
    The worker reports its device: the module never imports torch in Slicer's process."""
    if device and device.startswith("cpu") and requested == "auto":
        return ("No usable CUDA GPU (or the CPU build of PyTorch): ARENA runs on the CPU, slower. "
                "See Troubleshooting, 'CUDA', in the README.")
    return ""
