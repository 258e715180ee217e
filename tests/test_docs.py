"""Code blocks of the README and docs run as written (each in a fresh interpreter,
from an empty working directory, offline)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Pages whose every ```python block is a complete program: every page that has
# ```python blocks (docs/benchmarks.md has none). Signatures and recipes that need
# other machines or data are fenced as ```text instead.
RUNNABLE_PAGES = ["README.md", "docs/bop2nd.md", "docs/cli.md", "docs/deployment.md", "docs/fliplstm.md", "docs/suite.md",
                  "docs/greedy.md", "docs/meta.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for page in RUNNABLE_PAGES:
        text = (ROOT / page).read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{page}:{line}")


def _blocks_containing(page, needle):
    text = (ROOT / page).read_text()
    return [m.group(1) for m in BLOCK.finditer(text) if needle in m.group(1)]


def _run(code, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("code", list(_blocks()))
def test_page_block_runs_as_written(code, tmp_path):
    stdout = _run(code, tmp_path)
    if "# [loss, accuracy]" in code:  # the README's training snippet
        accuracy = float(re.findall(r"[-\d.e]+", stdout)[-1])
        assert accuracy > 0.8  # 6 epochs of FlipLSTM on digits; chance is 0.1


def test_fliplstm_validation_example_prints_what_it_says(tmp_path):
    (code,) = _blocks_containing("docs/fliplstm.md", "np.float32(-5)")
    expected = re.search(r"# (`flip_threshold`.*)$", code, re.M).group(1)
    assert _run(code, tmp_path).strip() == expected
