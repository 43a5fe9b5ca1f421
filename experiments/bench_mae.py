r"""Train-step throughput: MAE (encoder on the visible 25% of patches) vs supervised ViT, same encoder and batch.

    python experiments/bench_mae.py                  # CPU: a small ViT (width 192, depth 6, 64x64, 8x8 patches)
    python experiments/bench_mae.py --gpu-recipe     # GPU/TPU: ViT-B/16, 224x224, batch 256, bf16

He et al. (2021, Table 1c and Sec. 4.1) report that encoding only the visible patches makes
pretraining about 3x faster than an encoder that also processes mask tokens. Three train steps
are timed, each the full jitted step of the trainer (forward, backward, AdamW update):
  * mae             the `mae` objective, mask ratio 0.75 (encoder on 1/4 of the patches + cls);
  * mae_all_tokens  the same MAE with mask ratio 0: encoder and decoder on every patch;
  * supervised      the `supervised` objective: the same encoder on every patch, a linear head.
Images/s per device (the median of --repeats timings of --steps steps after --warmup steps, the arms
interleaved), printed as a markdown table and saved to experiments/out/bench_mae{,_gpu}.{md,json}.
experiments/gpu_report.py runs these arms (`ArmRunner`) with everything else one GPU should measure.
"""
import argparse
import os
import platform
import sys
import time
from typing import Any, Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402

from vitjax import config_utils, parallel  # noqa: E402
from vitjax import objectives as objectives_lib  # noqa: E402
from vitjax import train as trainer  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

CPU_RECIPE = dict(model=dict(variant="Ti/16", embed_dim=192, depth=6, num_heads=3, mlp_dim=768, patch_size=8,
                             img_size=64),
                  decoder=dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
                  batch_size=32, dtype="float32", num_classes=1000)
GPU_RECIPE = dict(model=dict(variant="B/16", img_size=224),
                  decoder=dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
                  batch_size=256, dtype="bfloat16", num_classes=1000)


ARMS = ("mae", "mae_all_tokens", "supervised")


def make_config(recipe: Dict[str, Any], arm: str):
    """Returns a validated run config for one arm of the benchmark."""
    if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}; valid choices: {list(ARMS)}")
    config = config_utils.default_config()
    # bf16 compute (`dtype`), fp32 master weights (the models' param_dtype default).
    config.model = dict(recipe["model"], dtype=recipe["dtype"])
    if arm == "supervised":
        config.objective = "supervised"
        config.model.update(num_classes=recipe["num_classes"], global_pool="token")
    else:
        config.objective = "mae"
        config.objective_kwargs = dict(recipe["decoder"], norm_pix_loss=True,
                                       mask_ratio=0.75 if arm == "mae" else 0.0)
    config.batch_size = recipe["batch_size"]
    config.total_steps = 1000
    config.optim.update(name="adamw", blr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=10)
    return config_utils.validate_config(config)


def xla_flops(compiled) -> float:
    """Returns the FLOPs XLA's cost analysis counts for one call of a compiled executable (nan if none).

    Custom calls (cuDNN, Pallas) count as 0, so the figure undercounts any step that uses them.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return float("nan")
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


class ArmRunner:
    """One arm's jitted train step (data-parallel over all devices), its state and a fixed batch."""

    def __init__(self, recipe: Dict[str, Any], arm: str):
        import flax.linen as nn
        self.arm = arm
        config = make_config(recipe, arm)
        objective = objectives_lib.create(config.objective, config)
        self.mesh = mesh = parallel.create_mesh(config.mesh)
        batch_size = config.batch_size
        img = recipe["model"]["img_size"]
        rng = np.random.default_rng(0)
        host_batch = {"image": rng.standard_normal((batch_size, img, img, 3)).astype(np.float32)}
        if arm == "supervised":
            labels = rng.integers(0, recipe["num_classes"], batch_size)
            host_batch["label"] = np.eye(recipe["num_classes"], dtype=np.float32)[labels]
        self.batch = parallel.global_batch(host_batch, mesh)
        # The trainer's own parts: optimizer, sharded state, the jitted step (labels already one-hot here).
        setup = trainer.create_train_setup(config, objective, mesh, host_batch, total_steps=config.total_steps)
        self.rules = setup.rules
        self.state = trainer.initial_state(setup, jax.random.key(0))
        with parallel.use_mesh(mesh), nn.logical_axis_rules(self.rules):
            step = trainer.jit_train_step(setup)
            start = time.time()
            # Compiled explicitly: the executable also answers what XLA thinks one step costs.
            self.step = step.lower(self.state, self.batch).compile()
            self.xla_flops_per_step = xla_flops(self.step)
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready(metrics)
        self.compile_seconds = time.time() - start
        self.batch_size = batch_size
        from vitjax.models.vit import decode_variant
        patch = recipe["model"].get("patch_size") or decode_variant(recipe["model"]["variant"])["patch_size"]
        self.encoder_tokens = (img // patch) ** 2 // (4 if arm == "mae" else 1)
        self.timings = []
        self.metrics = metrics

    def run(self, steps: int, record: bool = True) -> None:
        """Runs `steps` train steps; records their wall time when `record`."""
        import flax.linen as nn
        with parallel.use_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            start = time.perf_counter()
            for _ in range(steps):
                self.state, self.metrics = self.step(self.state, self.batch)
            jax.block_until_ready(self.metrics)
        if record:
            self.timings.append((time.perf_counter() - start) / steps)

    def result(self) -> Dict[str, Any]:
        """Returns the raw figures: median seconds per step and images/s per device."""
        seconds = float(np.median(self.timings))
        return {"arm": self.arm, "seconds_per_step": seconds, "seconds_per_step_all": self.timings,
                "images_per_sec_per_device": self.batch_size / seconds / self.mesh.size,
                "encoder_patch_tokens": self.encoder_tokens, "compile_seconds": self.compile_seconds,
                "xla_flops_per_step": self.xla_flops_per_step, "batch_size": self.batch_size,
                "final_loss": float(self.metrics["train/loss"]), "num_devices": self.mesh.size}


def main(argv=None) -> Dict[str, Any]:
    """Runs the benchmark, prints the markdown table and writes it beside the JSON of raw figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-recipe", dest="gpu_recipe", action="store_true",
                        help="ViT-B/16, 224, batch 256 per run, bf16 (for an accelerator)")
    parser.add_argument("--batch_size", type=int, default=None, help="override the recipe's global batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arms", default="mae,mae_all_tokens,supervised")
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    recipe = dict(GPU_RECIPE if args.gpu_recipe else CPU_RECIPE)
    if args.batch_size:
        recipe["batch_size"] = args.batch_size
    runners = []
    for arm in args.arms.split(","):
        runners.append(ArmRunner(recipe, arm))
        runners[-1].run(args.warmup, record=False)
    # Interleave the arms, so a slow spell of a shared machine hits all of them alike; report medians.
    for _ in range(args.repeats):
        for runner in runners:
            runner.run(args.steps)
    results = [runner.result() for runner in runners]
    for result in results:
        print(f"{result['arm']}: {result['images_per_sec_per_device']:.1f} images/s per device "
              f"(compile {result['compile_seconds']:.1f} s)", flush=True)
    by_arm = {r["arm"]: r for r in results}
    device = jax.devices()[0]
    device_name = getattr(device, "device_kind", device.platform)
    from vitjax.models.vit import decode_variant
    model = {**decode_variant(recipe["model"]["variant"]), **recipe["model"]}
    header = (f"Train-step throughput, {device_name} x {results[0]['num_devices']} ({platform.machine()}), "
              f"ViT width {model['embed_dim']}, depth {model['depth']}, patch {model['patch_size']}, "
              f"{model['img_size']}px ({(model['img_size'] // model['patch_size']) ** 2} patches), MAE decoder "
              f"{recipe['decoder']['decoder_embed_dim']} x {recipe['decoder']['decoder_depth']}, "
              f"global batch {recipe['batch_size']}, {recipe['dtype']}")
    lines = [header, "", "| train step | encoder patch tokens | images/s per device | vs supervised |",
             "|---|---|---|---|"]
    for result in results:
        ratio = (result["images_per_sec_per_device"] / by_arm["supervised"]["images_per_sec_per_device"]
                 if "supervised" in by_arm else float("nan"))
        lines.append(f"| {result['arm']} | {result['encoder_patch_tokens']} | "
                     f"{result['images_per_sec_per_device']:.1f} | {ratio:.2f}x |")
    if "mae" in by_arm and "mae_all_tokens" in by_arm:
        speedup = by_arm["mae"]["images_per_sec_per_device"] / by_arm["mae_all_tokens"]["images_per_sec_per_device"]
        lines += ["", f"Encoding only the visible patches: {speedup:.2f}x the throughput of the same MAE "
                      f"encoding every patch (paper: about 3x, Table 1c)."]
    table = "\n".join(lines)
    print(table)
    write_outputs(args.out_dir, "bench_mae_gpu" if args.gpu_recipe else "bench_mae", table,
                  {"recipe": recipe, "device": device_name, "jax": jax.__version__, "results": results})
    return {"recipe": recipe, "results": results}


if __name__ == "__main__":
    main()
