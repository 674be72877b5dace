"""benchmarks/timed_command.py: the record behind every wall-clock figure in the docs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_timed_command_records_its_time_cpu_and_exit_status(tmp_path):
    out = tmp_path / "t.json"
    busy = f"{sys.executable} -c 'sum(range(3 * 10 ** 6))'; sleep 0.3; exit 3"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "timed_command.py"), "--output", str(out),
                           "--note", "a test", busy], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 3  # the command's status passes through
    record = json.loads(out.read_text())
    assert record["command"] == busy and record["exit_status"] == 3 and record["note"] == "a test"
    assert record["wall_s"] >= 0.3 and 0 < record["cpu_s"] <= record["wall_s"] * record["cores"] + 0.1
    assert record["cpu_percent"] > 0
    assert record["cores"] == os.cpu_count() and len(record["load_average_before"]) == 3
