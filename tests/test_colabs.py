"""Every notebook under colabs/ runs top to bottom, offline on a CPU, in one fresh Python process."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))


def notebook_script(path: str) -> str:
    """Returns the notebook's code cells as one script, without shell (`!`) and magic (`%`) lines."""
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    assert notebook["nbformat"] == 4, path
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = cell["source"]
        source = "".join(source) if isinstance(source, list) else source
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))]
        cells.append("\n".join(lines))
    return "\n\n".join(cells) + "\n"


def test_notebooks_found():
    assert NOTEBOOKS, "no notebook under colabs/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    script = tmp_path / (os.path.splitext(os.path.basename(path))[0] + ".py")
    script.write_text(notebook_script(path), encoding="utf-8")
    # A fresh process: the notebook's own import order (torch before TensorFlow) is what runs, not pytest's.
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    if os.path.basename(path) == "explore_vitjax.ipynb":
        match = re.search(r"Final test top-1: ([0-9.]+)%", output)
        assert match, output[-6000:]
        assert float(match.group(1)) > 50.0, match.group(0)  # 200 steps reach about 85%; chance is 10%
        assert "Did you mean" in output, output[-6000:]
        assert "r=3: test top-1" in output, output[-6000:]
    if os.path.basename(path) == "clip_zeroshot.ipynb":
        match = re.search(r"Zero-shot test top-1 after 300 steps: ([0-9.]+)%", output)
        assert match, output[-6000:]
        assert float(match.group(1)) > 30.0, match.group(0)  # chance is 10%
        correct = re.search(r"(\d+) of 10 correct", output)
        assert correct and int(correct.group(1)) >= 3, output[-6000:]
        assert "text features: max relative error vs open_clip" in output, output[-6000:]  # converted weights
