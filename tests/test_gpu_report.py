"""experiments/gpu_report.py: the --smoke run end to end on the CPU (Pallas in interpret mode), its budget,
its FLOP counts and peak look-up. The GPU numbers themselves come only from a GPU session."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
sys.path.insert(0, EXPERIMENTS)

import bench_attention  # noqa: E402
import gpu_report  # noqa: E402

# The GPU machine may have none of these: the report must not import them (nor vitjax.data, which loads TF).
ABSENT = ("tensorflow", "tensorflow_datasets", "torch", "torchvision", "timm")


def _run(tmp_path, *args, block=ABSENT, status=0):
    """Returns (completed process, the report's markdown, its JSON) of `gpu_report.py --smoke ARGS`.

    Each name in `block` is shadowed, for the report's child processes too, by a package that raises ImportError.
    """
    shadows = tmp_path / "shadows"
    for name in block:
        (shadows / name).mkdir(parents=True)
        (shadows / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed (test shadow)')\n")
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one CPU device, not 8
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(shadows))
    out = tmp_path / "out"
    process = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "gpu_report.py"), "--smoke", "--out", str(out),
                              *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == status, process.stdout[-3000:] + process.stderr[-3000:]
    with open(out / "gpu_report_smoke.md") as f:
        table = f.read()
    with open(out / "gpu_report_smoke.json") as f:
        results = json.load(f)
    return process, table, results


def _by(records, key="impl"):
    return {record["cell"][key]: record for record in records if key in record["cell"]}


def test_interpret_smoke_run_fills_every_section_of_one_table(tmp_path):
    """About a minute on a shared 2-core CPU: every section runs in its own process; one of them dies on purpose."""
    process, table, results = _run(tmp_path, "--simulate-crash", "attention:1")
    assert results["complete"] and results["platform"] == "cpu" and results["device_kind"] == "cpu"
    assert "CPU smoke run" in table and "interpret mode" in table
    assert table.count("| section | setting | impl |") == 1  # one table
    for label in ("attention fwd", "attention fwd+bwd", "train step", "MAE train step", "MAE speed-up", "ToMe",
                  "int8 inference"):
        assert f"| {label} |" in table, label
    assert "skipped" not in table and "Traceback" not in process.stderr

    attention = _by(results["sections"]["attention"])
    assert attention["pallas"]["max_rel_error_forward"] <= 2e-2  # bf16 kernel vs bf16 XLA
    assert attention["pallas"]["max_rel_error_grads"] <= 3e-2
    assert attention["xla"]["forward_ms"] > 0 and attention["pallas"]["forward_backward_ms"] > 0
    # The cuDNN cell's process died (simulated): reported, and a fresh process measured the xla cell after it.
    assert "its process died (exit status 7)" in attention["cudnn"]["error"]

    train = _by(results["sections"]["train"])
    assert "cuDNN needs a CUDA GPU, the platform is cpu" in train["cudnn"]["error"]
    for impl in ("xla", "pallas"):
        assert train[impl]["images_per_sec_per_device"] > 0 and math.isfinite(train[impl]["final_loss"])
        assert train[impl]["analytic_flops_per_image"] == 3 * gpu_report.vit_forward_flops(
            gpu_report.model_settings(gpu_report.SMOKE_RECIPE), gpu_report.SMOKE_RECIPE["num_classes"])
    # Same init, same batch, same three steps: the interpreted kernel trains like XLA (bf16 compute).
    assert train["pallas"]["final_loss"] == pytest.approx(train["xla"]["final_loss"], rel=2e-2)

    mae = _by(results["sections"]["mae"], key="arm")
    assert mae["mae"]["encoder_patch_tokens"] == 4 and mae["mae_all_tokens"]["encoder_patch_tokens"] == 16
    ratio = results["sections"]["mae"][-1]["ratio"]
    assert ratio == pytest.approx(mae["mae"]["images_per_sec_per_device"]
                                  / mae["mae_all_tokens"]["images_per_sec_per_device"])

    tome = {(r["r"], r["merge_impl"]): r for r in results["sections"]["tome"]}
    # 17 tokens, 2 blocks: r=4 merges 4 per block, 17 -> 13 -> 9.
    assert tome[(0, "-")]["final_tokens"] == 17
    assert tome[(4, "jnp")]["final_tokens"] == tome[(4, "pallas")]["final_tokens"] == 9

    int8 = _by(results["sections"]["int8"], key="mode")
    assert int8["int8"]["int8_dots"] == 1 * 4 + 1 and int8["bf16"]["int8_dots"] == 0  # qkv, proj, fc1, fc2; head
    assert int8["int8"]["max_rel_diff_vs_bf16"] < 0.1


def test_a_spent_budget_skips_every_cell_with_a_note(tmp_path):
    _, table, results = _run(tmp_path, "--budget", "0")
    assert results["complete"]
    for section in ("attention", "train", "mae", "tome", "int8"):
        records = results["sections"][section]
        assert records and all(record.get("skipped") == "budget" for record in records), section
    assert table.count("skipped: the section's time budget is spent") == 3 + 3 + 2 + 3 + 2


def test_the_hard_limit_ends_the_run_with_a_report_that_says_where(tmp_path):
    _, table, results = _run(tmp_path, "--hard-limit", "4", status=2)
    assert results["status"] == "stopped at --hard-limit 4 s" and not results["complete"]
    assert "stopped at --hard-limit 4 s" in table
    records = [record for section in gpu_report.SECTIONS for record in results["sections"][section]]
    # The limit falls inside one cell, or (on a slow machine) between two sections, never in two cells.
    assert sum("reached during this cell" in record.get("error", "") for record in records) <= 1
    assert any("--hard-limit 4 s reached" in record.get("error", "") for record in records)
    # Every cell has its row: measured before the limit, or stopped by it.
    cells = sum(len(gpu_report.section_cells(name, gpu_report.SMOKE[name])) for name in gpu_report.SECTIONS)
    assert len([r for r in records if "ratio" not in r]) == cells


def test_without_ml_collections_the_train_cells_say_so(tmp_path):
    _, _, results = _run(tmp_path, "--sections", "mae", block=ABSENT + ("ml_collections",))
    records = results["sections"]["mae"]
    assert len(records) == 2 and all("ml_collections is not installed" in record["error"] for record in records)


def test_analytic_flops_match_the_published_counts():
    # ViT-B/16 at 224: 17.6 GMACs per image (fvcore, as in DeiT's and timm's tables) = 35.1 GFLOPs.
    vit_b = gpu_report.model_settings(dict(model=dict(variant="B/16", img_size=224)))
    assert gpu_report.vit_forward_flops(vit_b, 1000) == pytest.approx(2 * 17.58e9, rel=5e-3)
    # MAE ViT-B/16 with the 512 x 8 decoder: the encoder on 49 + 1 tokens is 8.6 GFLOPs instead of 34.9, the
    # decoder (10.6) is the same in both: mask 0.75 does 2.35x fewer FLOPs than mask 0, not the paper's ~3x.
    decoder = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    masked, full = (gpu_report.mae_forward_flops(vit_b, decoder, ratio) for ratio in (0.75, 0.0))
    # What differs: the encoder blocks and the encoder-to-decoder projection, on 197 tokens instead of 50.
    assert full - masked == pytest.approx(gpu_report.transformer_flops(197, 768, 12, 3072)
                                          - gpu_report.transformer_flops(50, 768, 12, 3072)
                                          + 2 * (197 - 50) * 768 * 512)
    assert full / masked == pytest.approx(2.35, abs=0.01)


@pytest.mark.parametrize("device_kind, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756),
                                               ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312),
                                               ("cpu", None)])
def test_bf16_peak_is_looked_up_from_the_device_name(device_kind, peak):
    assert bench_attention.bf16_peak(device_kind) == peak
