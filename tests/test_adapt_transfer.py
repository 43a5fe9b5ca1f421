"""experiments/transfer.py end to end on the runlocal model: the PVP path (stage 1 on the source task, then the
target run from its workdir) writes one table with the trained-parameter share and top-1."""
import json
import os
import sys

import pytest

from test_train import run, tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import transfer  # noqa: E402


def test_transfer_pvp_runs_stage1_then_the_target_and_writes_the_table(tmp_path, capsys):
    base = str(tmp_path / "base")
    run(tiny_config(total_steps=2), base)
    out = str(tmp_path / "table")
    transfer.main([f"--init_from={base}", "--config=configs/digits_vit.py:runlocal", "--methods=pvp", "--seeds=0",
                   "--steps=2", "--pvp_source_steps=2", "--train_split=train[:64]", "--pvp_source_split=train[64:128]",
                   f"--out={out}"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [("pvp_source" in record) for record in printed] == [True, False]  # stage 1 once, then the target
    with open(out + ".json") as f:
        results = json.load(f)
    (target,) = results["runs"]
    assert target["method"] == "pvp" and 0.0 <= target["top1"] <= 100.0
    # VPT deep, 5 prompts per layer, on the width-32, depth-2 runlocal model: 2 x 5 x 32 prompts + the head (330).
    assert results["fractions"]["pvp"]["trained"] == 2 * 5 * 32 + 330
    with open(out + ".md") as f:
        table = f.read()
    assert f"| pvp | 650 ({results['fractions']['pvp']['percent']:.2f}%) | {target['top1']:.2f} +- 0.00 |" in table


def test_transfer_rejects_unknown_methods():
    with pytest.raises(SystemExit, match="valid choices"):
        transfer.main(["--init_from=/nonexistent", "--methods=vpt,prompt"])
