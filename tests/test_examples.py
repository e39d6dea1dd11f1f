"""The README's main job (examples/demo.py) runs and checks its own figures."""

import os
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "examples", "demo.py")


def run_demo(path):
    return subprocess.run([sys.executable, DEMO, path], capture_output=True, text=True,
                          timeout=300)


def test_demo_runs_twice_on_one_file_without_losing_an_increment(tmp_path):
    path = str(tmp_path / "demo.dobbin")
    first = run_demo(path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "+600, expected +600" in first.stdout
    assert "bob saw 600 until begin(), then 601" in first.stdout
    second = run_demo(path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "counter              : 601 -> 1201" in second.stdout
