"""metrics.jsonl: one JSON record per epoch, each line whole, flushed and fsync'd.

A line that cannot be written whole is cut off again; a resumed run rewrites
the file atomically from its checkpoint's history.
"""

import json
import os
from pathlib import Path

from distnn.files import write_whole, writing


class MetricsLog:
    """One JSON object per epoch in metrics.jsonl, each line flushed and fsync'd."""

    def __init__(self, path):
        self.path = Path(path)

    def rewrite(self, records):
        """Replace the file with ``records`` (a resumed run drops lines past its checkpoint)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        write_whole(self.path, lambda f: f.write(text.encode()))

    def append(self, record):
        """Add one line, whole or not at all."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with writing(self.path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                size = os.fstat(fd).st_size
                try:
                    written = 0
                    while written < len(line):
                        written += os.write(fd, line[written:])
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
