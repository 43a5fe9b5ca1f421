r"""What checkpoint verification costs for a ViT-B/16-sized train state, on this machine's CPU.

    python experiments/verify_cost.py                     # ViT-B/16: 86.6M params fp32 + AdamW's two moments
    python experiments/verify_cost.py --model=vit_small_patch16_224 --repeats=5

The state is fabricated, not trained: the model's parameter shapes (`jax.eval_shape`, no init) filled
with random fp32 values, and AdamW's mu and nu of the same shapes, as `vitjax.train.TrainState` holds
them (about 1.04 GB). It is saved once with `vitjax.checkpoint.Checkpointer` (synchronously) and
restored --repeats times with and without verification, interleaved; the table gives medians.
  fingerprint      `checkpoint.fingerprints(state)`: one pass over every array, where it lives;
  save             `Checkpointer.save` + wait (includes computing the fingerprints);
  restore          `Checkpointer.restore(..., verify=False)`: orbax alone;
  restore+verify   `Checkpointer.restore(...)`: orbax, then the fingerprints compared;
  verify command   `checkpoint.verify_step`, what `python -m vitjax.checkpoint verify` does per step.
The files are in the OS page cache after the save, so these are restore times from memory: a
restore from a disk or a bucket takes longer, and verification's share is smaller.
Writes experiments/out/verify_cost.{md,json}.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from vitjax import checkpoint, models  # noqa: E402
from vitjax import train as trainer  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def fabricate_state(model_name: str, seed: int = 0) -> trainer.TrainState:
    """Returns a TrainState of the model's shapes (params, AdamW mu and nu) filled with random fp32 values."""
    module = models.create(model_name)
    size = module.img_size if isinstance(module.img_size, int) else module.img_size[0]
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    params_shapes = trainer.unbox(abstract["params"])
    rng = np.random.default_rng(seed)
    fill = lambda scale: jax.tree.map(  # noqa: E731
        lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * scale), params_shapes)
    params = fill(0.02)
    opt_state = optax.adamw(1e-3).init(params)
    opt_state = (opt_state[0]._replace(mu=fill(1e-3), nu=jax.tree.map(jnp.abs, fill(1e-6))),) + tuple(opt_state[1:])
    return trainer.TrainState(step=jnp.asarray(1000, jnp.int32), params=params, opt_state=opt_state, model_state={},
                              rng=jax.random.PRNGKey(seed))


def timed(function):
    """Returns (function's result, seconds), after waiting for every array it returned."""
    start = time.perf_counter()
    result = function()
    jax.block_until_ready(result)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="A registered model name.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args()

    state = fabricate_state(args.model)
    count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))  # noqa: E731
    num_params, num_values = count(state.params), count(state)
    gigabytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / 1e9
    print(f"{args.model}: {num_params / 1e6:.1f}M params, state {num_values / 1e6:.1f}M values, {gigabytes:.2f} GB")

    _, first_fingerprint = timed(lambda: checkpoint.fingerprints(state))  # includes compiling
    fingerprint_times = [timed(lambda: checkpoint.fingerprints(state))[1] for _ in range(args.repeats)]
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), state)

    root = tempfile.mkdtemp(prefix="verify_cost_")
    try:
        directory = os.path.join(root, "checkpoints")
        saver = checkpoint.Checkpointer(directory, keep=2, async_save=False)
        _, save_seconds = timed(lambda: saver.save(1, state, {"data_step": 1}) and saver.wait_until_finished())
        restore_times, verified_times, command_times = [], [], []
        for _ in range(args.repeats):  # interleaved, so that drifting machine load hits both alike
            restore_times.append(timed(lambda: saver.restore(1, abstract, verify=False))[1])
            verified_times.append(timed(lambda: saver.restore(1, abstract))[1])
            verification, seconds = timed(lambda: checkpoint.verify_step(directory, 1))
            assert verification.status == "verified", verification
            command_times.append(seconds)
        saver.close()
        disk_bytes = sum(os.path.getsize(os.path.join(folder, name))
                         for folder, _, names in os.walk(os.path.join(directory, "1")) for name in names)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    median = statistics.median
    restore, verified = median(restore_times), median(verified_times)
    results = dict(model=args.model, num_params=num_params, num_state_values=num_values, state_gb=gigabytes,
                   disk_gb=disk_bytes / 1e9, repeats=args.repeats, cpu_count=os.cpu_count(),
                   device=str(jax.devices()[0].device_kind), fingerprint_first_s=first_fingerprint,
                   fingerprint_s=fingerprint_times, save_s=save_seconds, restore_s=restore_times,
                   restore_verified_s=verified_times, verify_command_s=command_times)
    rows = [("fingerprint (first call, with compilation)", first_fingerprint),
            ("fingerprint", median(fingerprint_times)),
            ("save (fingerprints included), synchronous", save_seconds),
            ("restore, unverified", restore),
            ("restore + verify", verified),
            ("verify command (`verify_step`)", median(command_times))]
    table = "\n".join(
        [f"Checkpoint verification cost: {args.model}, {num_params / 1e6:.1f}M params fp32 + AdamW mu, nu = "
         f"{num_values / 1e6:.0f}M values ({gigabytes:.2f} GB; {disk_bytes / 1e9:.2f} GB on disk), "
         f"{os.cpu_count()} CPU cores, medians of {args.repeats}.", "",
         "| step | seconds |", "|---|---:|"]
        + [f"| {name} | {seconds:.2f} |" for name, seconds in rows]
        + ["", f"Verification adds {verified - restore:.2f} s to a {restore:.2f} s restore "
               f"({100 * (verified - restore) / restore:.0f}%), from the page cache."])
    print(table)
    print("wrote", write_outputs(args.out, "verify_cost", table, results))


if __name__ == "__main__":
    main()
