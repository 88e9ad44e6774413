"""Behaves like Slicer's ``PythonSlicer`` launcher (CTK AppLauncher): runs its arguments as a
child process that shares its stdin, stdout and stderr (``QProcess::ForwardedChannels`` and
``ForwardedInputChannel``), forwards no signal (SIGTERM ends the launcher only), and exits with
the child's exit code when the child exits."""

import subprocess
import sys

sys.exit(subprocess.Popen(sys.argv[1:]).wait())
