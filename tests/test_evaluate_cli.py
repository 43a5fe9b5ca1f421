"""`python -m vitjax.evaluate`: timm parity of converted weights, a workdir alone, clear errors."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from parity_utils import randomize_, relative_error
from test_train import REPO, run

timm = pytest.importorskip("timm")

NAME = "vit_tiny_patch16_224"
SHRINK = dict(depth=2, img_size=32, patch_size=8, num_classes=10)  # in_chans 3: the gray digits go through gray_to_rgb
NUM_EXAMPLES = 40


def _env():
    """Returns the child's environment: one CPU device (the tests' 8 fake ones would only slow a tiny model) and the
    tests' compilation cache."""
    import jax
    return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _metrics(stdout: str) -> dict:
    """Returns top1, top5, loss and num_examples from the closing line of `python -m vitjax.evaluate`."""
    match = re.search(r"top-1 ([\d.]+)%, top-5 ([\d.]+)%, loss ([\d.]+), (\d+) examples", stdout)
    assert match, stdout[-2000:]
    return dict(top1=float(match.group(1)) / 100, top5=float(match.group(2)) / 100, loss=float(match.group(3)),
                num_examples=int(match.group(4)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Returns (reference torch module, .pth path, .msgpack path written by `python -m vitjax.convert`)."""
    from vitjax.convert.__main__ import cli
    directory = tmp_path_factory.mktemp("evaluate_cli")
    reference = timm.create_model(NAME, pretrained=False, **SHRINK).eval()
    randomize_(reference, seed=0, std=0.15)
    torch.save(reference.state_dict(), directory / "tiny.pth")
    cli(["--source=timm", f"--model={NAME}", f"--checkpoint={directory / 'tiny.pth'}", "--img_size=32",
         "--num_classes=10", "--set=depth=2", "--set=patch_size=8", f"--out={directory / 'tiny.msgpack'}"])
    return reference, directory / "tiny.pth", directory / "tiny.msgpack"


def _reference_logits(reference):
    """Returns (timm's logits, labels) of the first NUM_EXAMPLES digits test images, preprocessed as the model's
    pretrained cfg says (built here independently of the CLI)."""
    import vitjax.data as data
    from vitjax import models
    pp = data.pretrained_pp(models.pretrained_cfg(NAME), image_size=32, channels=1)
    batch = next(iter(data.make_eval_iterator(dict(dataset="digits", eval_split="test", pp_eval=pp),
                                              global_batch_size=NUM_EXAMPLES, process_index=0, process_count=1)))
    images = np.asarray(batch["image"])
    assert images.shape == (NUM_EXAMPLES, 32, 32, 3) and np.asarray(batch["mask"]).all()
    with torch.no_grad():
        logits = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    return logits, np.asarray(batch["label"])


def test_converted_timm_vit_evaluates_to_timm_logits(converted, tmp_path):
    """The convert -> evaluate commands: meta carries the model and preprocessing; logits and metrics are timm's."""
    from vitjax.convert.io import load_variables_and_meta
    reference, _, msgpack = converted
    _, meta = load_variables_and_meta(str(msgpack))
    assert meta["model_name"] == NAME and meta["model"] == {**SHRINK, "img_size": 32}
    assert meta["pretrained_cfg"] == dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=0.9,
                                          interpolation="bicubic")
    logits_path = tmp_path / "logits.npy"
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.evaluate", f"--init_from={msgpack}", "--dataset=digits", "--batch_size=16",
         f"--num_examples={NUM_EXAMPLES}", f"--save_logits={logits_path}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| loaded | 32 | 932,554 |" in result.stdout  # every tensor loaded, none re-initialised
    expected, labels = _reference_logits(reference)
    ours = np.load(logits_path)
    assert ours.shape == (NUM_EXAMPLES, 10)
    assert relative_error(ours, expected) <= 1e-5
    metrics = _metrics(result.stdout)
    log_probs = torch.log_softmax(torch.from_numpy(expected).double(), -1).numpy()
    assert metrics["num_examples"] == NUM_EXAMPLES
    assert metrics["top1"] == pytest.approx(np.mean(expected.argmax(-1) == labels), abs=1e-4)
    top5 = np.mean([label in np.argsort(-row)[:5] for row, label in zip(expected, labels)])
    assert metrics["top5"] == pytest.approx(top5, abs=1e-4)
    assert metrics["loss"] == pytest.approx(-np.mean(log_probs[np.arange(NUM_EXAMPLES), labels]), abs=1e-5)


def test_timm_checkpoint_evaluates_directly(converted, tmp_path):
    """A .pth is converted on the fly for --model with its options; the class count comes from the dataset."""
    from vitjax.convert.__main__ import cli as convert_cli
    from vitjax.evaluate import pretrained
    reference, pth, _ = converted
    result = pretrained.evaluate_pretrained(str(pth), model_name=NAME, model_overrides=dict(depth=2, patch_size=8),
                                            dataset="digits", image_size=32, num_examples=NUM_EXAMPLES,
                                            return_logits=True, log=lambda _: None)
    expected, _ = _reference_logits(reference)
    assert result.model_overrides["num_classes"] == 10
    assert relative_error(result.logits, expected) <= 1e-5
    # Weights without the classifier: a class count other than the dataset's is refused, and a fresh head
    # (which would be evaluated at random) too, naming its tensors.
    headless = tmp_path / "headless.msgpack"
    convert_cli(["--source=timm", f"--model={NAME}", f"--checkpoint={pth}", "--img_size=32", "--num_classes=0",
                 "--set=depth=2", "--set=patch_size=8", f"--out={headless}"])
    with pytest.raises(ValueError, match="The model has 0 classes but dataset 'digits' has 10"):
        pretrained.evaluate_pretrained(str(headless), dataset="digits", log=lambda _: None)
    with pytest.raises(ValueError, match=r"leaves 2 tensor\(s\) .*params/head/(bias|kernel) \(re-initialised"):
        pretrained.evaluate_pretrained(str(headless), dataset="digits", model_overrides=dict(num_classes=10),
                                       log=lambda _: None)


def test_quickstart_workdir_evaluates_with_init_from_alone(tmp_path, capsys):
    """A vitjax workdir names its model, data and preprocessing: the evaluation repeats the trainer's final one."""
    from vitjax import config_utils
    from vitjax.evaluate.__main__ import cli
    config = config_utils.load_config(os.path.join(REPO, "configs/digits_vit.py:runlocal"))
    config.progress_bar = False
    config.checkpoint_async = False
    workdir = str(tmp_path / "digits")
    final = run(config, workdir)
    cli([f"--init_from={workdir}"])
    metrics = _metrics(capsys.readouterr().out)
    assert metrics["num_examples"] == final["eval/num_examples"] == 360
    assert metrics["top1"] == pytest.approx(final["eval/top1"], abs=1e-4)
    assert metrics["top5"] == pytest.approx(final["eval/top5"], abs=1e-4)
    assert metrics["loss"] == pytest.approx(final["eval/loss"], abs=1e-5)


def test_bad_input_fails_clearly(converted, tmp_path):
    from vitjax.convert.__main__ import cli as convert_cli
    from vitjax.evaluate.__main__ import cli
    _, pth, msgpack = converted
    result = subprocess.run([sys.executable, "-m", "vitjax.evaluate", f"--init_from={msgpack}",
                             "--model=vit_tiny_patch16_2244", "--dataset=digits"],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "FATAL: Unknown model 'vit_tiny_patch16_2244'. Did you mean ['vit_tiny_patch16_224'" in result.stderr
    assert "Valid choices: [" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "vitjax.convert", "--source=tim", f"--checkpoint={pth}",
                             "--out=/tmp/unused.msgpack"], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "flag --source=tim: value should be one of <timm|mae|resample|open_clip|transformers>" in result.stderr
    cases = [
        (lambda: cli([f"--init_from={tmp_path / 'missing.msgpack'}"]), "FATAL: init_from .*: nothing at .*missing"),
        (lambda: cli([f"--init_from={pth}", "--dataset=digits"]), "does not name its model: give --model"),
        (lambda: cli([f"--init_from={msgpack}"]), "names no dataset: give --dataset"),
        (lambda: cli([f"--init_from={msgpack}", "--dataset=digits", "--set=depth"]), "--set takes KEY=VALUE"),
        (lambda: cli([f"--init_from={msgpack}", "--dataset=digits", "--split=valid"]),
         r"Bad --split 'valid' for dataset 'digits'.*splits: test, train"),
        (lambda: cli(["--dataset=digits"]), "Flag --init_from must have a value other than None"),
        (lambda: convert_cli(["--source=timm", f"--checkpoint={pth}", "--out=/tmp/unused.msgpack"]),
         r"--source=timm needs --model"),
    ]
    for call, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            call()
        assert re.search(message, str(exit_info.value)), str(exit_info.value)
