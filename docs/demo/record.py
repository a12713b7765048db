"""Record a command's terminal output as an asciicast v2 file (play it with ``asciinema play`` or the web
player). The command runs on a pseudo-terminal of the given size, so live views draw as they would for a
user; each chunk of output is stored with its time.

    python docs/demo/record.py docs/demo/sudoku-solve.cast -- dgemma sudoku solve --show puzzles.txt
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
import time


def record(command: list[str], out: str, width: int = 100, height: int = 30, env: dict | None = None) -> int:
    """Run ``command`` on a pseudo-terminal, write the cast to ``out``; the command's exit status."""
    master, slave = pty.openpty()
    env = {**os.environ, **(env or {}), "TERM": "xterm-256color", "COLUMNS": str(width), "LINES": str(height)}
    t0 = time.time()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    events = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not data:
            break
        events.append([round(time.time() - t0, 4), "o", data.decode("utf-8", "replace")])
    os.close(master)
    rc = proc.wait()
    header = {"version": 2, "width": width, "height": height, "timestamp": int(t0),
              "command": " ".join(command), "env": {"TERM": "xterm-256color"}}
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for e in events:
            f.write(json.dumps(e) + "\n")
    os.replace(tmp, out)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--height", type=int, default=30)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to record after --")
    return record(command, args.out, args.width, args.height)


if __name__ == "__main__":
    sys.exit(main())
