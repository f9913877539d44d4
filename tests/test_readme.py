import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Documents whose repo paths must exist (README, docs/, the export and bench notes).
DOCS = ["README.md", "export/README.md", "bench/README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
# A path is checked when it starts with one of the repository's own folders;
# run outputs (runs/, exported/) and placeholders (path/to/...) are not files here.
REPO_DIRS = ("bs_keras", "bench", "export", "tests", "docs", ".ci")
PATH_RE = re.compile(r"(?<![\w./~-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|png|json|cfg|toml|sh))(?![\w/])")
LINK_RE = re.compile(r"\]\(([^)#\s]+)\)")
BARE_PY_RE = re.compile(r"`([\w-]+\.py)`")
SKIP_DIRS = {".venv", ".git", "runs", "exported", "build"}


def _block(heading):
    """The first Python code block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _quick_start():
    return _block("## Quick start")


def _doc_paths():
    for doc in DOCS:
        path = ROOT / doc
        if not path.exists():
            continue
        text = path.read_text()
        for match in PATH_RE.finditer(text):
            name = match.group(1)
            if name.split("/", 1)[0] in REPO_DIRS:
                yield doc, name, ROOT / name
        for match in LINK_RE.finditer(text):  # markdown links, relative to the document
            target = match.group(1)
            if "://" not in target:
                yield doc, target, path.parent / target


def _repo_py_names():
    names = set()
    for path in ROOT.rglob("*.py"):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            names.add(path.name)
    return names


def test_readme_and_docs_name_only_existing_repo_files():
    missing = {f"{doc}: {name}" for doc, name, path in _doc_paths() if not path.exists()}
    py_names = _repo_py_names()
    for doc in DOCS:
        if (ROOT / doc).exists():  # a bare `module.py` (as in the module map) must exist somewhere
            missing.update(f"{doc}: {n}" for n in BARE_PY_RE.findall((ROOT / doc).read_text()) if n not in py_names)
    missing = sorted(missing)
    assert not missing, "stale paths:\n" + "\n".join(missing)


@pytest.mark.heavy  # whole-program run, >= ~30 s: make test-all / CI only
@pytest.mark.slow  # one subprocess: the quick start, then the budget and distillation blocks that continue it
def test_readme_quick_start_budget_and_distillation_blocks_run_and_learn(tmp_path):
    """The quick start trains and learns; the budget block continues it (same
    model and data) and follows its target; the distillation block continues
    it again through the wrapper, logs the term, and saves the gated student.
    One process for the three, as a reader runs them (the quick start ran
    twice when each block had its own test)."""
    code = _quick_start()
    assert len(code.strip().splitlines()) <= 12
    check = (
        "\nh = history.history\n"
        "assert h['accuracy'][-1] > 0.9, h['accuracy']\n"
        "assert 'cond_macs_ratio' in h and 'gate_open_rate' in h\n"
        "assert 0 < per_sample.min() <= per_sample.max() <= bs_keras.count_macs(model)\n"
    )
    budget_block = _block("## Train to a compute budget")
    check_budget = (
        "\nh = model.history.history\n"
        "assert h['mac_target'][-1] == 0.5 and h['mac_target'][0] > 0.5, h['mac_target']\n"
        "assert budget.multiplier > 0 and 'hard_macs_ratio' in h\n"
        "print('BUDGET_OK')\n"
    )
    distill_block = _block("## Distillation")
    check_distill = (
        "\nh = distiller.history.history\n"
        "assert len(h['distill_loss']) == 2 and all(v > 0 for v in h['distill_loss']), h\n"
        "assert 'l0_loss' in h\n"
        "saved = keras.models.load_model('gated_distilled.keras')\n"
        "assert type(saved).__name__ == 'Functional' and bs_keras.find_gates(saved)\n"
        "print('DISTILL_OK')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code + check + budget_block + check_budget + distill_block + check_distill],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "of the static count" in result.stdout
    assert "BUDGET_OK" in result.stdout and "DISTILL_OK" in result.stdout


@pytest.mark.heavy  # whole-program run, >= ~30 s: make test-all / CI only
@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_readme_gate_a_model_you_already_have_runs():
    """The README's add_gates block: outputs kept at the start, then it trains
    and the gates learn (in process: about 10 s)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Gate a model you already have", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 5 <= len(code.strip().splitlines()) <= 10
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    import bs_keras

    model, base = scope["model"], scope["base"]
    gates = bs_keras.find_gates(model)
    assert len(gates) == 16 and model.get_layer("conv2_block1_1_conv") is not base.get_layer("conv2_block1_1_conv")
    assert any(abs(float(v)) > 0 for g in gates for v in np.ravel(g.logits_dense.kernel))
    assert "cond_macs_ratio" in model.history.history
