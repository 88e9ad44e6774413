"""A worker that ignores every polite stop (SIGTERM, end of stdin), for the safety-net test:
only killing its process tree ends it."""

import json
import os
import signal
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stdout.write(json.dumps({"event": "started", "pid": os.getpid(), "device": "cpu"}) + "\n")
sys.stdout.flush()
while True:
    time.sleep(0.1)
