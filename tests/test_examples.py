"""The examples run end to end (in a subprocess, as a user would start them)."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # run as a user would: auto must not depend on the test lane
    res = subprocess.run([sys.executable, "examples/quickstart.py", "--steps", "3", "--seed", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, f"exit code {res.returncode}\nstdout:\n{out}\nstderr:\n{res.stderr}"

    # 0. the backend report of every op
    for op in ("gated_prefix_attention", "pst_masked_weight", "child_tuning_adamw", "child_tuning_keep_mask"):
        assert re.search(rf"^{op} on \w+/\w+", out, re.M), op
    assert "auto ->" in out

    # (a) attention agrees with the reference backend
    m = re.search(r"max \|auto - reference\| forward: (\S+)", out)
    assert m and float(m.group(1)) < 1e-4, out
    m = re.search(r"max \|auto - reference\| gradients .*: (\S+)", out)
    assert m and float(m.group(1)) < 1e-3, out

    # (b) PST prunes exactly floor(64 * 64 * 0.9) = 3686 entries
    assert "3686 of 4096 zeroed, realised sparsity 0.8999" in out, out
    assert "auto and reference masks equal: True" in out

    # (c) Child-Tuning, both modes
    assert re.search(r"Fisher mask: \d+ parameters", out), out
    assert re.search(r"before training: eval loss [\d.]+, accuracy [\d.]+", out), out
    for mode in ("D", "F"):
        assert re.search(rf"Child-Tuning-{mode} after 3 steps .*accuracy [\d.]+ -> [\d.]+", out), out
    assert "quickstart done in" in out
