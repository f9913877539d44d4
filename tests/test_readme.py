import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_and_learns():
    code = _quick_start()
    assert len(code.strip().splitlines()) <= 12
    check = (
        "\nh = history.history\n"
        "assert h['accuracy'][-1] > 0.9, h['accuracy']\n"
        "assert 'cond_macs_ratio' in h and 'gate_open_rate' in h\n"
        "assert 0 < per_sample.min() <= per_sample.max() <= bs_keras.macs.count_macs(model)\n"
        "print('README_OK')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code + check],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "README_OK" in result.stdout
    assert "of the static count" in result.stdout
