r"""Peak training memory of parameter-efficient adaptation vs full fine-tuning, from XLA's memory analysis.

    python experiments/adapt_memory.py                      # ViT-B/16, 224 px, batch 32: a few minutes on 2 CPU cores
    python experiments/adapt_memory.py --model=vit_tiny_patch16_224 --batch_size=8   # a quick look

For each method the run's own train step (`vitjax.train.jit_train_step`: AdamW, donated state, fp32) is
lowered with abstract inputs and compiled for this machine's backend (CPU here; nothing runs), and
`compiled.memory_analysis()` gives the bytes of the arguments (train state and batch), the outputs, the
temporaries and the aliased (donated) buffers. Peak = arguments + outputs - aliased + temporaries: what
the step holds at once. Other backends schedule and fuse differently (a GPU's figure differs), but the
difference between the methods — the optimizer state and the gradients of frozen weights — is structural.
Written to experiments/out/adapt_memory.{md,json}.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402

from vitjax import checkpoint, config_utils, objectives, parallel, train  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# id: (label, settings); the PEFT methods at their papers' ViT-B/16 settings (VPT: 10 prompts per layer).
METHODS = {
    "full": ("full fine-tuning", {}),
    "lora_qkv": ("LoRA r=8 (qkv)", {"adapt": dict(method="lora", rank=8, alpha=8.0, targets=("qkv",))}),
    "lora_all": ("LoRA r=8 (qkv, proj, fc1, fc2)", {"adapt": dict(method="lora", rank=8, alpha=8.0, targets=(
        "attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"))}),
    "vpt_deep": ("VPT deep, 10 prompts", {"adapt": dict(method="vpt", num_tokens=10, deep=True)}),
    "adapter": ("AdaptFormer, bottleneck 64", {"adapt": dict(method="adapter", bottleneck=64)}),
    "hst": ("HST (32-72 wide side network)", {"adapt": dict(method="hst")}),
    "dvpt": ("DVPT deep, 10 prompts, meta_dim 16", {"adapt": dict(method="dvpt", num_tokens=10, deep=True,
                                                                  meta_dim=16)}),
}


def measure(model: str, batch_size: int, image_size: int, settings) -> dict:
    """Returns the memory analysis (bytes) of one compiled train step and the trained-param count."""
    config = config_utils.default_config()
    config.model_name = model
    config.model = dict(num_classes=1000, img_size=image_size)
    config.input = dict(dataset="imagenet2012")
    config.batch_size = batch_size
    config.total_steps = 100
    config.optim.update(name="adamw", lr=1e-3, weight_decay=0.05)
    if "adapt" in settings:
        config.adapt.update(settings["adapt"])
        config.init_from = "base-weights"  # a reference only: nothing is loaded for the analysis
    config = config_utils.validate_config(config)
    objective = objectives.create(config.objective, config)
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    batch = {"image": np.zeros((batch_size, image_size, image_size, 3), np.float32),
             "label": np.zeros((batch_size, 1000), np.float32)}
    setup = train.create_train_setup(config, objective, mesh, batch, total_steps=100)
    state = checkpoint.abstract_like(setup.abstract_state, setup.state_shardings)
    abstract_batch = {key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=setup.batch_sharding)
                      for key, value in batch.items()}
    start = time.time()
    with parallel.use_mesh(mesh):
        compiled = train.jit_train_step(setup).lower(state, abstract_batch).compile()
    analysis = compiled.memory_analysis()
    mask = train.optim.trainable_mask(config.optim, setup.abstract_state.params, train.adapted_params(config))
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(setup.abstract_state.params)]
    trained = sum(size for size, use in zip(sizes, jax.tree.leaves(mask)) if use)
    figures = dict(argument=analysis.argument_size_in_bytes, output=analysis.output_size_in_bytes,
                   alias=analysis.alias_size_in_bytes, temp=analysis.temp_size_in_bytes,
                   optimizer_state=sum(leaf.size * leaf.dtype.itemsize
                                       for leaf in jax.tree.leaves(setup.abstract_state.opt_state)),
                   trained_params=trained, total_params=sum(sizes), compile_seconds=time.time() - start)
    figures["peak"] = figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--out", default="adapt_memory")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "full" not in methods:
        raise SystemExit(f"--methods must include 'full' (the reference) and only {list(METHODS)}; got {methods}")
    results = {}
    for method in methods:
        name, settings = METHODS[method]
        results[name] = measure(args.model, args.batch_size, args.image_size, settings)
        print(name, results[name], flush=True)
    mib = lambda value: f"{value / 2 ** 20:,.0f}"  # noqa: E731
    lines = [f"Train step of {args.model}, batch {args.batch_size} at {args.image_size} px, AdamW, fp32, "
             f"XLA memory analysis on {jax.devices()[0].platform.upper()} (MiB)", "",
             "| method | trained params | optimizer state | arguments | temporaries | peak | peak vs full |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    full = results["full fine-tuning"]["peak"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['trained_params']:,} ({100 * r['trained_params'] / r['total_params']:.2f}%) | "
                     f"{mib(r['optimizer_state'])} | {mib(r['argument'])} | {mib(r['temp'])} | {mib(r['peak'])} | "
                     f"{r['peak'] / full:.2f}x |")
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, args.out, table, dict(args=vars(args), results=results))


if __name__ == "__main__":
    main()
