r"""Inference images/s of ViT-B/16 with its Dense matmuls in int8 (qwix, `vitjax.quant.int8`) against bf16.

    python experiments/int8_bench.py              # GPU: ViT-B/16, 224 px, batch 256
    python experiments/int8_bench.py --smoke      # CPU: a tiny ViT, only proves the script runs (not a benchmark)

Random weights (std 0.02), one batch of random images; the bf16 arm computes in bf16 with bf16 weights, the
int8 arm is the same model with `quantize(..., backend="qwix")`: int8 kernels (per-channel absmax scales),
activations quantized per token on the fly, int8 x int8 -> int32 dots, the rest (attention matmuls, the
patch-embedding conv, norms, GELU) in bf16. Timing: jit, one warm-up call, best of `repeats` runs of
`iters` calls. Also the max relative difference of the int8 logits from the bf16 ones, and the count of
s8 dots in the traced program. Writes experiments/out/int8_bench.{md,json} (int8_bench_smoke.* for --smoke).
experiments/gpu_report.py runs the same cells (`Int8Bench`) as its "int8" section.
"""
import argparse
import os
import sys
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
FULL = dict(model="vit_base_patch16_224", overrides={}, batch=256, iters=10, repeats=3)
SMOKE = dict(model="vit_tiny_patch16_224", overrides=dict(img_size=32, patch_size=8, depth=2, embed_dim=32,
                                                          num_heads=2), batch=4, iters=2, repeats=1)
MODES = ("bf16", "int8")


class Int8Bench:
    """One model's random weights and image batch, timed in bf16 and with qwix int8 matmuls."""

    def __init__(self, name: str, *, batch: int, overrides: Dict[str, Any]):
        from bench_tome import random_params
        from vitjax import models
        self.name, self.batch = name, batch
        self.model = models.create(name, dtype=jnp.bfloat16, **overrides)
        size = self.model.img_size if isinstance(self.model.img_size, int) else self.model.img_size[0]
        self.images = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3), jnp.float32).astype(jnp.bfloat16)
        self.params = random_params(self.model, self.images, jnp.float32)
        self.logits: Dict[str, np.ndarray] = {}

    def run(self, mode: str, iters: int, repeats: int) -> Dict[str, Any]:
        """Returns images/s and ms per batch of `mode` ("bf16" or "int8"), its logits' difference from bf16."""
        from bench_tome import time_call
        from vitjax import quant
        from vitjax.quant import int8
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; valid choices: {MODES}")
        if mode == "bf16":
            variables = {"params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), self.params)}
            apply = self.model.apply
        else:
            qmodel, variables = quant.quantize(self.model, {"params": self.params}, [self.images[:1]],
                                               method="minmax", backend="qwix", act_granularity="token")
            apply = qmodel.apply
        forward = jax.jit(lambda variables, images: apply(variables, images)[0])
        seconds = time_call(forward, (variables, self.images), iters, repeats)
        logits = np.asarray(forward(variables, self.images), np.float32)
        self.logits[mode] = logits
        record = dict(model=self.name, mode=mode, batch=self.batch, images_per_sec=self.batch / seconds,
                      ms_per_batch=1e3 * seconds,
                      int8_dots=int8.dot_dtypes(lambda v, x: apply(v, x)[0], variables, self.images[:1]).count(
                          ("int8", "int8", "int32")))
        if mode != "bf16" and "bf16" in self.logits:
            reference = self.logits["bf16"]
            record["max_rel_diff_vs_bf16"] = float(np.abs(logits - reference).max() / np.abs(reference).max())
        print(f"{self.name} {mode}: {record['images_per_sec']:.1f} img/s ({record['ms_per_batch']:.2f} ms/batch, "
              f"{record['int8_dots']} int8 dots)", flush=True)
        return record


def main(argv=None) -> Dict[str, Any]:
    """Times both modes, prints the markdown table and writes it with the raw records."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model (CPU): proves the script runs")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    platform = jax.default_backend()
    bench = Int8Bench(settings["model"], batch=settings["batch"], overrides=settings["overrides"])
    records = [bench.run(mode, settings["iters"], settings["repeats"]) for mode in MODES]
    device = getattr(jax.devices()[0], "device_kind", platform)
    label = ("CPU SMOKE RUN, a tiny ViT: proves the script runs, says nothing of int8 speed"
             if args.smoke or platform == "cpu" else f"{device}")
    lines = [f"int8 (qwix) vs bf16 inference, {settings['model']} {settings['overrides'] or ''}, batch "
             f"{settings['batch']}, random weights; {label}; jax {jax.__version__}.", "",
             "| mode | images/s | ms / batch | int8 dots | max rel. diff of logits vs bf16 |",
             "|---|---:|---:|---:|---:|"]
    for record in records:
        diff = record.get("max_rel_diff_vs_bf16")
        lines.append(f"| {record['mode']} | {record['images_per_sec']:.1f} | {record['ms_per_batch']:.2f} | "
                     f"{record['int8_dots']} | {'-' if diff is None else f'{diff:.3f}'} |")
    lines.append("")
    lines.append(f"int8 / bf16 images/s: {records[1]['images_per_sec'] / records[0]['images_per_sec']:.2f}x")
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, "int8_bench_smoke" if args.smoke else "int8_bench", table,
                  dict(settings=settings, platform=platform, device=device, records=records))
    return dict(records=records)


if __name__ == "__main__":
    main()
