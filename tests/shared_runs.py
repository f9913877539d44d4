"""train.py runs made once per test session and read by several tests.

A tiny train.py run costs ~20 s on these 2 cores, almost all of it fixed
(TensorFlow import, tracing the gated train step, the report). Tests that only
read a finished run share one: `once()` makes it the first time any pytest-xdist
worker asks for it (the others wait on an flock), and records its exit code and
output next to it. Tests that resume, kill or change a run make their own.
"""

import fcntl
import json
import os
import pathlib
import subprocess
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet20", "--width-multiplier", "0.25", "--batch-size", "32",
        "--limit-train", "128", "--limit-eval", "64", "--seed", "0"]

# The shared runs. The gated one has a fixed L0 weight (bench/diagnose.py
# freeze needs one) and runs with TensorFlow's log level left to train.py
# (tests/test_cli_quiet.py reads its output for start-up lines).
GATED_ARGS = [*TINY, "--epochs", "2", "--lam", "2"]
PLAIN_ARGS = [*TINY, "--plain", "--epochs", "1"]


def run_train(args, timeout=300, env=None, **kwargs):
    """train.py in a subprocess, TensorFlow's C++ log off, output captured."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT)) if env is None else env
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def quiet_default_env():
    """The environment of a user who set no TensorFlow log level."""
    drop = ("TF_CPP_MIN_LOG_LEVEL", "BS_KERAS_TF_LOG_LEVEL_DEFAULTED")
    return dict({k: v for k, v in os.environ.items() if k not in drop}, PYTHONPATH=str(ROOT))


def session_root(tmp_path_factory):
    """A folder all xdist workers of this session share (each worker's
    basetemp is a subfolder of the session's)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_runs"
    root.mkdir(exist_ok=True)
    return root


def once(root, name, args, env=None, timeout=300):
    """train.py `args` + `--run-dir root/name`, run by the first caller only.

    Returns a namespace with run_dir, args (without --run-dir), returncode,
    stdout and stderr; the caller asserts on them."""
    run_dir = root / name
    record = root / f"{name}.result.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        if not record.exists():
            result = run_train([*args, "--run-dir", str(run_dir)], timeout=timeout, env=env)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"returncode": result.returncode, "stdout": result.stdout,
                                       "stderr": result.stderr}))
            os.replace(tmp, record)
        data = json.loads(record.read_text())
    return types.SimpleNamespace(run_dir=run_dir, args=list(args), **data)
