#!/usr/bin/env python
"""Time a shell command and keep the measurement: the source of every wall-clock figure in README and docs.

    python benchmarks/timed_command.py --output docs/timings/test_suite.json -- \\
        'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && ...'

Runs the command with bash in the current folder and writes JSON: the command, its exit status, wall seconds,
the CPU seconds of everything it started (user + system) and their ratio to the wall time (200% = both of two
cores busy), the machine (cores, load average before the start), the date and the git commit. The command's
own output passes through. Exits with the command's status.
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="The JSON file to write.")
    parser.add_argument("--note", default="", help="Free text kept with the measurement (e.g. 'unloaded').")
    parser.add_argument("command", help="The shell command (one string, run with bash -c).")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    status = subprocess.run(["bash", "-c", args.command]).returncode
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    record = {"command": args.command, "exit_status": status, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "cpu_percent": round(100 * cpu / wall), "cores": os.cpu_count(),
              "load_average_before": [round(x, 2) for x in load_before], "started_utc": started.isoformat(timespec="seconds"),
              "git_commit": git_commit(), "note": args.note}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"timed_command: {wall:.1f} s wall, {record['cpu_percent']}% CPU, exit {status} -> {args.output}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
