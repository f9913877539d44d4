"""The command lines answer --help without TensorFlow, and start it without
its C++ log unless asked for (--verbose, or TF_CPP_MIN_LOG_LEVEL set by the
user). The subprocesses run with TF_CPP_MIN_LOG_LEVEL as the case says, not
the suite's (tests/conftest.py sets 2)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from bs_keras.cli import tf_startup

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORD = re.compile(r"^[IWEF]\d{4} \S+\s+\d+ (\S+:\d+)\] ", re.M)  # an absl log record, by its source line
BANNER = "absl::InitializeLog()"


def _env(level=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(tf_startup.LEVEL_VAR, None)
    if level is not None:
        env[tf_startup.LEVEL_VAR] = level
    return env


def _run(args, level=None, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(level), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    "module, argv, expected",
    [("train", ["--help"], "--list-recipes"), ("train", ["--list-recipes"], "fashion_mnist_demo"),
     ("export", ["--help"], "--calibration")],
)  # fmt: skip
def test_help_and_recipes_do_not_import_tensorflow(module, argv, expected):
    code = (f"import sys\nfrom bs_keras.cli.{module} import main\n"
            f"try:\n    status = main({argv!r})\nexcept SystemExit as e:\n    status = e.code\n"
            "print('status', status, 'tensorflow' in sys.modules, 'keras' in sys.modules)")  # fmt: skip
    result = _run(["-c", code], timeout=60)
    assert expected in result.stdout, result.stderr
    assert result.stdout.splitlines()[-1] == "status 0 False False", result.stderr


@pytest.mark.parametrize(
    "imports",
    ["import bs_keras, keras", "import keras, bs_keras", "import bs_keras.gates, keras",
     "import bs_keras.recipes, keras"],
)
def test_the_lazy_package_still_registers_its_layers_for_load_model(imports):
    """`import bs_keras` loads no TensorFlow, yet every custom object is
    registered once Keras is imported, in any import order, so a plain
    `keras.models.load_model` reads saved bs_keras models."""
    code = (f"{imports}\nimport sys\n"
            "names = ['ChannelGate', 'Distiller', 'WarmUp', 'MacBudget', 'ZeroPadShortcut']\n"
            "print([keras.saving.get_registered_object('bs_keras>' + n) is not None for n in names])")
    result = _run(["-c", code], timeout=120)
    assert result.stdout.splitlines()[-1] == str([True] * 5), result.stdout + result.stderr


# TensorFlow's start-up as file descriptor 2 sees it, with a Python warning between.
FAKE_STARTUP = f"""
import os, sys, warnings
from bs_keras.cli import tf_startup

def fake_start():
    os.write(2, b"WARNING: All log messages before {BANNER} is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1796425603.188809    7747 port.cc:153] oneDNN custom operations are on.\\n")
    warnings.warn("a Python warning")
    os.write(2, b"W0000 00:00:1796425603.189124    7747 stub.cc:31] a warning record\\n")
    os.write(2, b"E0000 00:00:1796425606.175744    7747 cuda_platform.cc:52] failed call to cuInit\\n")
    os.write(2, b"a line of a C library\\n")

tf_startup._start = fake_start
tf_startup.import_tensorflow(verbose=sys.argv[1] == "verbose")
print(os.environ.get(tf_startup.LEVEL_VAR))
"""


@pytest.mark.parametrize(
    "level, verbose, shown",
    [(None, False, []), ("1", False, ["stub.cc:31", "cuda_platform.cc:52"]), ("2", False, ["cuda_platform.cc:52"]),
     (None, True, ["port.cc:153", "stub.cc:31", "cuda_platform.cc:52"])],
)  # fmt: skip
def test_startup_log_shows_records_from_the_asked_level(level, verbose, shown):
    result = _run(["-c", FAKE_STARTUP, "verbose" if verbose else "quiet"], level, timeout=60)
    assert RECORD.findall(result.stderr) == shown, result.stderr
    assert (BANNER in result.stderr) == verbose, result.stderr
    assert "UserWarning: a Python warning" in result.stderr and "a line of a C library" in result.stderr
    # Unset, records after the start-up show from level 2 (errors) on; --verbose makes TF's default (0) explicit.
    assert result.stdout.strip() == str(level or ("0" if verbose else "2"))


def test_a_child_of_a_quiet_process_stays_quiet():
    """The level a quiet start-up sets (2) is inherited by child processes
    (a sweep driver's train.py runs): they must not take it for the user's."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "BS_KERAS_TF_LOG_LEVEL_DEFAULTED")}
    code = FAKE_STARTUP + "import subprocess; subprocess.run([sys.executable, '-c', CHILD, 'quiet'], check=True)\n"
    code = "CHILD = " + repr(FAKE_STARTUP) + "\n" + code
    result = subprocess.run([sys.executable, "-c", code, "quiet"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert RECORD.findall(result.stderr) == [], result.stderr
    assert result.stdout.split() == ["2", "2"]


@pytest.mark.slow
def test_short_run_prints_no_tensorflow_log(tiny_gated_run):
    """A CPU-only run (the session's shared run, started without
    TF_CPP_MIN_LOG_LEVEL): none of TensorFlow's start-up lines (absl banner,
    oneDNN, CUDA drivers, cuInit, CPU instructions); Keras' epoch line stays."""
    assert tiny_gated_run.returncode == 0, tiny_gated_run.stderr[-3000:]
    output = tiny_gated_run.stdout + tiny_gated_run.stderr
    assert RECORD.findall(output) == [] and BANNER not in output, output
    for text in ("oneDNN", "cuda", "cuInit", "cpu_feature_guard", "This TensorFlow binary"):
        assert text not in output, output
    assert re.search(r"^4/4 - .*accuracy: ", tiny_gated_run.stdout, re.M), tiny_gated_run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cli, level", [("train", None), ("export", "0")])
def test_verbose_or_user_level_shows_the_tensorflow_log(cli, level, tmp_path):
    """train.py --verbose, and python -m export with the user's
    TF_CPP_MIN_LOG_LEVEL=0, show what a bare TensorFlow start-up prints (they
    stop after it: the model does not exist / is no Keras file)."""
    bare = _run(["-c", "import tensorflow as tf; tf.config.list_physical_devices()"])
    expected = set(RECORD.findall(bare.stderr))
    if not expected:
        pytest.skip("this TensorFlow prints no log records at start-up")
    if cli == "train":
        args = ["train.py", "--verbose", "--evaluate", "--model-path", "missing.keras", "--dataset", "fashion_mnist"]
        error = "missing.keras does not exist"
    else:
        (tmp_path / "bad.keras").write_text("not a zip")
        args = ["-m", "export", str(tmp_path / "bad.keras"), "--out", str(tmp_path / "out")]
        error = "cannot load"
    result = _run(args, level)
    assert result.returncode == 2 and error in result.stderr, result.stderr[-3000:]
    assert expected <= set(RECORD.findall(result.stderr)), result.stderr


LITERT_LINE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"


@pytest.mark.parametrize("level, shown", [(None, False), ("2", False), ("0", True)])
def test_litert_info_lines_show_only_at_level_0(level, shown, capfd, monkeypatch):
    """LiteRT writes its INFO lines to file descriptor 2 itself; they are
    dropped unless TF_CPP_MIN_LOG_LEVEL is 0 (what --verbose sets). Other
    lines written meanwhile still show, in order."""
    from bs_keras import native_log

    if level is None:
        monkeypatch.delenv(native_log.LEVEL_VAR, raising=False)
    else:
        monkeypatch.setenv(native_log.LEVEL_VAR, level)
    capfd.readouterr()
    with native_log.litert_info_hidden():
        os.write(2, b"before\n" + LITERT_LINE + b"after\n")
    err = capfd.readouterr().err
    assert err == ("before\n" + LITERT_LINE.decode() * shown + "after\n")


@pytest.mark.slow  # an export subprocess: ~15 s
def test_tflite_export_prints_no_litert_info_line(tiny_gated_run, tmp_path):
    """`python -m export --format tflite` on a CPU-only machine: the parity
    check runs the LiteRT interpreter, whose XNNPACK INFO line stays hidden."""
    assert tiny_gated_run.returncode == 0, tiny_gated_run.stderr[-3000:]
    result = _run(["-m", "export", str(tiny_gated_run.run_dir / "last.keras"), "--out", str(tmp_path / "tfl"),
                   "--format", "tflite", "--latency-runs", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "tfl").glob("*.tflite")), result.stdout
    output = result.stdout + result.stderr
    assert "XNNPACK" not in output and not re.search(r"^INFO: ", output, re.M), output
    assert RECORD.findall(output) == [] and BANNER not in output, output
