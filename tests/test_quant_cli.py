"""`python -m vitjax.quant`: a vitjax workdir alone gives model and data; FP32 and quantized top-1; bad input."""
import re

import pytest

from test_train import run, tiny_config

NUM_EXAMPLES = 48


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Returns a workdir of the tiny digits ViT trained for 40 steps."""
    path = str(tmp_path_factory.mktemp("quant_cli") / "run")
    run(tiny_config(total_steps=40, batch_size=64, eval_every_steps=40, checkpoint_every_steps=40), path)
    return path


def test_workdir_alone_prints_fp32_and_quantized_top1(workdir, capsys):
    """The FP32 top-1 is vitjax.evaluate's; W8A8 AdaLog stays within 1 point (48 images) of it."""
    from vitjax.evaluate import pretrained
    from vitjax.quant.__main__ import cli
    args = [f"--init_from={workdir}", "--method=adalog", "--w_bits=8", "--a_bits=8", "--calib_batches=1",
            "--calib_batch_size=16", f"--num_examples={NUM_EXAMPLES}", "--batch_size=48"]
    results = cli(args)
    printed = capsys.readouterr().out
    fp32_line = re.search(r"FP32: .* top-1 ([\d.]+)%", printed)
    quant_line = re.search(r"adalog W8A8: .* top-1 ([\d.]+)%, .*, (\d+) examples", printed)
    assert fp32_line and quant_line, printed[-2000:]
    assert int(quant_line.group(2)) == NUM_EXAMPLES
    reference = pretrained.evaluate_pretrained(workdir, num_examples=NUM_EXAMPLES, batch_size=48, log=lambda _: None)
    assert results["fp32"].metrics["top1"] == pytest.approx(reference.metrics["top1"], abs=1e-6)
    assert float(fp32_line.group(1)) == pytest.approx(100 * reference.metrics["top1"], abs=0.01)
    assert abs(results["quantized"].metrics["top1"] - results["fp32"].metrics["top1"]) <= 1 / NUM_EXAMPLES + 1e-6
    assert "2 x post-softmax adalog 8-bit" in printed and "2 x activation adalog 8-bit" in printed


@pytest.mark.parametrize("args, message", [
    (["--w_bits=9"], "w_bits must be an integer bit width in 2..8"),
    (["--a_bits=1"], "a_bits must be an integer bit width in 2..8"),
    (["--calib_batches=0"], "zero batches"),
    (["--method=awq"], "valid choices: ('minmax', 'percentile', 'mse', 'log2', 'adalog')"),
])
def test_bad_input_exits_with_one_line(workdir, args, message):
    """Bad flags stop with FATAL and the reason, before loading or compiling anything."""
    from vitjax.quant.__main__ import cli
    with pytest.raises(SystemExit) as raised:
        cli([f"--init_from={workdir}"] + args)
    assert str(raised.value).startswith("FATAL") and message in str(raised.value)
