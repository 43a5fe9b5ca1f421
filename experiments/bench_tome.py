r"""ToMe inference throughput: ViT-B/16 and ViT-L/16, bf16, batch 256, jnp vs Pallas merge.

    python experiments/bench_tome.py                 # on a GPU (or TPU): the paper's settings
    python experiments/bench_tome.py --smoke         # a tiny model on the CPU (minutes: Pallas interprets)

For each model and r (ViT-B/16: r = 0, 8, 13, 16; ViT-L/16: r = 0, 8) and each merge implementation
("jnp", "pallas"), a jitted forward of random weights (images/s do not depend on the weights) on
--batch images; the best of --repeats timings of --iters forwards. Speed-up is against r=0 (no merge,
so one number for both implementations). The paper's anchors (Bolya et al. 2023, off the shelf,
fp16 on a V100/A100): ViT-B/16 r=16 about 2x, ViT-L/16 r=8 about 2x.

Then the merge step alone: one merge of r tokens out of ViT-B/16's 197 (x (B, 197, 768), keys
(B, 197, 64)) against one plain ViT-B/16 block on 197 tokens: the issue asks for under 5% of a block.
The two merges are also compared on the device (same slots, max |difference| of the tokens).

Writes experiments/out/bench_tome.{md,json} (--smoke: bench_tome_smoke.{md,json}).
experiments/gpu_report.py runs the model cells (`ModelBench`) with everything else one GPU should measure.
"""
import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import models  # noqa: E402
from vitjax.kernels import tome_merge  # noqa: E402
from vitjax.models import vit  # noqa: E402
from vitjax.tokens import tome  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
FULL = {"vit_base_patch16_224": (0, 8, 13, 16), "vit_large_patch16_224": (0, 8)}
SMOKE = {"vit_tiny_patch16_224": (0, 2, 4)}
SMOKE_OVERRIDES = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)
# The merge-step measurement: ViT-B/16's block and sequence.
MERGE_SHAPE = dict(num_tokens=197, embed_dim=768, num_heads=12, mlp_dim=3072)
SMOKE_MERGE_SHAPE = dict(num_tokens=65, embed_dim=64, num_heads=2, mlp_dim=256)


def time_call(function: Callable, args, iters: int, repeats: int) -> float:
    """Returns the best seconds per call over `repeats` runs of `iters` calls (after one warm-up call)."""
    jax.block_until_ready(function(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = function(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def random_params(model, images, dtype, seed=0):
    """Returns random params of `model` in `dtype` (shapes from eval_shape; drawn in one jit, one compile)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])["params"]
    leaves, treedef = jax.tree.flatten(shapes)

    @jax.jit
    def draw(key):
        keys = jax.random.split(key, len(leaves))
        return [(0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(dtype)
                for key, leaf in zip(keys, leaves)]

    return jax.tree.unflatten(treedef, draw(jax.random.PRNGKey(seed)))


class ModelBench:
    """One model's random weights and image batch, timed with ToMe at any (r, merge impl)."""

    def __init__(self, name: str, *, batch: int, dtype, attention_impl: str = "xla", overrides=None):
        self.name, self.batch, self.dtype = name, batch, dtype
        self.attention_impl, self.overrides = attention_impl, dict(overrides or {})
        base = models.create(name, dtype=dtype, attention_impl=attention_impl, **self.overrides)
        size = base.img_size if isinstance(base.img_size, int) else base.img_size[0]
        self.images = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3), jnp.float32).astype(dtype)
        self.params = random_params(base, self.images, dtype)
        self.depth, self.num_prefix_tokens = base.depth, base.num_prefix_tokens
        self.num_tokens = base.num_prefix_tokens + base.grid_size[0] * base.grid_size[1]

    def run(self, r: int, merge_impl: str, iters: int, repeats: int) -> Dict[str, Any]:
        """Returns images/s, ms per batch and the token count after the last block at this (r, merge impl)."""
        model = models.create(self.name, dtype=self.dtype, attention_impl=self.attention_impl,
                              tome=dict(r=r, merge_impl=merge_impl), **self.overrides)
        forward = jax.jit(lambda params, images: model.apply({"params": params}, images)[0])
        seconds = time_call(forward, (self.params, self.images), iters, repeats)
        _, counts = tome.token_counts(self.num_tokens, tome.merge_schedule(r, self.depth), self.num_prefix_tokens)
        record = dict(model=self.name, r=r, merge_impl=merge_impl if r else "-",
                      images_per_sec=self.batch / seconds, ms_per_batch=1e3 * seconds, final_tokens=counts[-1])
        print(f"{self.name} r={r} {record['merge_impl']}: {record['images_per_sec']:.0f} img/s "
              f"({record['ms_per_batch']:.2f} ms/batch, {counts[-1]} tokens at the end)", flush=True)
        return record


def bench_models(args, dtype) -> List[Dict[str, Any]]:
    """Returns one record per (model, r, merge impl): images/s and tokens after the last block."""
    records = []
    settings = SMOKE if args.smoke else FULL
    overrides = SMOKE_OVERRIDES if args.smoke else {}
    for name, rs in settings.items():
        bench = ModelBench(name, batch=args.batch, dtype=dtype, attention_impl=args.attention_impl,
                           overrides=overrides)
        for r in rs:
            for impl in (("jnp",) if r == 0 else ("jnp", "pallas")):
                records.append(bench.run(r, impl, args.iters, args.repeats))
        baseline = next(rec for rec in records if rec["model"] == name and rec["r"] == 0)
        for rec in records:
            if rec["model"] == name:
                rec["speedup"] = rec["images_per_sec"] / baseline["images_per_sec"]
    return records


def bench_merge_step(args, dtype) -> Dict[str, Any]:
    """Returns the time of one merge (jnp, pallas) and of one plain block at the same shape."""
    shape = SMOKE_MERGE_SHAPE if args.smoke else MERGE_SHAPE
    num_tokens, width, heads = shape["num_tokens"], shape["embed_dim"], shape["num_heads"]
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.normal(size=(args.batch, num_tokens, width)), dtype)
    keys = jnp.asarray(rng.normal(size=(args.batch, num_tokens, width // heads)), dtype)
    sizes = jnp.ones((args.batch, num_tokens), jnp.float32)
    block = vit.Block(num_heads=heads, mlp_dim=shape["mlp_dim"], dtype=dtype, attention_impl=args.attention_impl)
    block_params = jax.tree.map(lambda leaf: leaf.astype(dtype),
                                jax.jit(block.init)(jax.random.PRNGKey(0), tokens[:1])["params"])
    block_forward = jax.jit(lambda params, x: block.apply({"params": params}, x)[0])
    block_seconds = time_call(block_forward, (block_params, tokens), args.iters, args.repeats)
    result = dict(shape=dict(shape, batch=args.batch), block_ms=1e3 * block_seconds, merges={})
    for r in args.merge_rs:
        outputs = {}
        for impl in ("jnp", "pallas"):
            merge = jax.jit(lambda x, k, s, r=r, impl=impl: tome_merge.merge(x, k, s, r, 1, impl))
            seconds = time_call(merge, (tokens, keys, sizes), args.iters, args.repeats)
            outputs[impl] = merge(tokens, keys, sizes)
            result["merges"][f"{impl}_r{r}"] = dict(ms=1e3 * seconds, share_of_block=seconds / block_seconds)
            print(f"merge r={r} {impl}: {1e3 * seconds:.3f} ms = {100 * seconds / block_seconds:.1f}% of a block "
                  f"({1e3 * block_seconds:.3f} ms)", flush=True)
        same_slots = float(np.mean(np.asarray(outputs["jnp"].slot) == np.asarray(outputs["pallas"].slot)))
        difference = float(jnp.max(jnp.abs(outputs["jnp"].tokens.astype(jnp.float32)
                                            - outputs["pallas"].tokens.astype(jnp.float32))))
        result["merges"][f"agreement_r{r}"] = dict(same_slot_fraction=same_slots, max_abs_token_difference=difference)
    return result


def markdown(args, device_kind, records, merge) -> str:
    """Returns the markdown report."""
    lines = [f"ToMe inference throughput on {device_kind} ({jax.default_backend()}), {args.dtype}, batch {args.batch}, "
             f"attention_impl={args.attention_impl}, random weights; best of {args.repeats} x {args.iters} forwards.",
             "", "| model | r | merge | tokens at the end | images/s | speed-up |", "|---|---|---|---|---|---|"]
    for rec in records:
        lines.append(f"| {rec['model']} | {rec['r']} | {rec['merge_impl']} | {rec['final_tokens']} | "
                     f"{rec['images_per_sec']:.0f} | {rec['speedup']:.2f}x |")
    shape = merge["shape"]
    lines += ["", f"Merge step alone, x ({shape['batch']}, {shape['num_tokens']}, {shape['embed_dim']}): one plain "
              f"block takes {merge['block_ms']:.3f} ms.", "",
              "| r | merge | ms | share of a block | same slots as jnp | max abs diff |", "|---|---|---|---|---|---|"]
    for r in args.merge_rs:
        agreement = merge["merges"][f"agreement_r{r}"]
        for impl in ("jnp", "pallas"):
            entry = merge["merges"][f"{impl}_r{r}"]
            check = ("-", "-") if impl == "jnp" else (f"{100 * agreement['same_slot_fraction']:.2f}%",
                                                      f"{agreement['max_abs_token_difference']:.2e}")
            lines.append(f"| {r} | {impl} | {entry['ms']:.3f} | {100 * entry['share_of_block']:.1f}% | "
                         f"{check[0]} | {check[1]} |")
    lines += ["", "Paper anchors (off the shelf): ViT-B/16 r=16 about 2x, ViT-L/16 r=8 about 2x; "
              "merge step under 5% of a block."]
    return "\n".join(lines)


def main(argv=None) -> Dict[str, Any]:
    """Runs the benchmark; returns the raw figures (also written to --out_dir)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on any device: proves the script runs")
    parser.add_argument("--batch", type=int, default=None, help="default 256 (smoke: 4)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--attention_impl", default="xla", help="vitjax.kernels.ATTENTION_IMPLS")
    parser.add_argument("--iters", type=int, default=None, help="forwards per timing (default 10, smoke 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--merge_rs", default="8,16", help="r values of the merge-step measurement")
    parser.add_argument("--allow_cpu", action="store_true", help="run the full-size benchmark on a CPU anyway")
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.smoke else 256)
    args.iters = args.iters or (2 if args.smoke else 10)
    args.merge_rs = [int(value) for value in args.merge_rs.split(",")]
    if args.smoke:
        args.merge_rs = [min(r, tome_merge.max_merge(SMOKE_MERGE_SHAPE["num_tokens"], 1)) for r in args.merge_rs]
    if jax.default_backend() == "cpu" and not (args.smoke or args.allow_cpu):
        raise SystemExit("No accelerator: ViT-L/16 at batch 256 would take hours on a CPU. Run on a GPU/TPU, "
                         "or pass --smoke (or --allow_cpu).")
    dtype = jnp.dtype(args.dtype)
    device_kind = jax.devices()[0].device_kind
    started = time.time()
    records = bench_models(args, dtype)
    merge = bench_merge_step(args, dtype)
    table = markdown(args, device_kind, records, merge)
    print(table)
    results = dict(device_kind=device_kind, platform=jax.default_backend(), jax_version=jax.__version__,
                   settings={k: v for k, v in vars(args).items() if k != "out_dir"}, models=records,
                   merge_step=merge, seconds=time.time() - started)
    stem = write_outputs(args.out_dir, "bench_tome_smoke" if args.smoke else "bench_tome", table, results)
    print(f"wrote {stem}.md and {stem}.json")
    return results


if __name__ == "__main__":
    main()
