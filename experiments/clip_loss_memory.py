r"""Per-device memory of the contrastive losses, from XLA's memory analysis, on fake CPU devices.

    python experiments/clip_loss_memory.py              # under a minute

Compiles value-and-gradient (w.r.t. both feature arrays) of each loss on meshes of 2, 4 and 8 devices
(batch sharded over "data") for per-device batches b, embedding 256, and reads
`compiled.memory_analysis().temp_size_in_bytes` (per device):
- sigmoid, chunked: `vitjax.objectives.clip.sharded_loss("sigmoid", ...)`, SigLIP's ring;
- sigmoid, full matrix: `sigmoid_loss` on the same sharded inputs, partitioned by XLA as it likes;
- softmax, gathered: `sharded_loss("softmax", ...)`, CLIP's all-gather, local rows x global batch.

Writes experiments/out/clip_loss_memory.{md,json}.
"""
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiment_io import write_outputs  # noqa: E402

from vitjax import parallel  # noqa: E402
from vitjax.objectives import clip  # noqa: E402

OUT_DIR = os.path.join(REPO, "experiments", "out")
EMBED = 256
DEVICES = (2, 4, 8)
PER_DEVICE = (32, 64, 128, 256)
KINDS = {
    "sigmoid, chunked ring": lambda mesh: lambda i, t, s, b: clip.sharded_loss("sigmoid", i, t, s, b, mesh=mesh),
    "sigmoid, full matrix": lambda mesh: clip.sigmoid_loss,
    "softmax, all-gathered": lambda mesh: lambda i, t, s, b: clip.sharded_loss("softmax", i, t, s, b, mesh=mesh),
}


def temp_bytes(kind: str, num_devices: int, per_device: int) -> int:
    """Returns XLA's per-device temporary bytes of value_and_grad of the loss `kind`."""
    mesh = parallel.create_mesh(dict(data=num_devices, fsdp=1, model=1), devices=jax.devices()[:num_devices])
    features = jax.ShapeDtypeStruct((num_devices * per_device, EMBED), jnp.float32,
                                    sharding=parallel.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))
    compiled = jax.jit(jax.value_and_grad(KINDS[kind](mesh), argnums=(0, 1))).lower(
        features, features, scalar, scalar).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main():
    """Measures every (kind, devices, per-device batch); returns the raw results (also written to experiments/out)."""
    started = time.time()
    rows = [dict(kind=kind, devices=n, per_device_batch=b, global_batch=n * b, temp_bytes=temp_bytes(kind, n, b))
            for kind in KINDS for n in DEVICES for b in PER_DEVICE]
    lines = [f"Per-device temporary memory (KiB, XLA memory analysis) of loss + gradients, embedding {EMBED}, "
             f"batch sharded over n fake CPU devices; b = per-device batch, global batch n x b.", "",
             "| loss | n | " + " | ".join(f"b={b}" for b in PER_DEVICE) + " |",
             "|---|---:|" + "---:|" * len(PER_DEVICE)]
    for kind in KINDS:
        for n in DEVICES:
            cells = [next(row["temp_bytes"] for row in rows if row["kind"] == kind and row["devices"] == n
                          and row["per_device_batch"] == b) / 1024 for b in PER_DEVICE]
            lines.append(f"| {kind} | {n} | " + " | ".join(f"{cell:,.0f}" for cell in cells) + " |")
    lines += ["", f"{time.time() - started:.0f} s."]
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, "clip_loss_memory", table, dict(embed=EMBED, rows=rows))
    return rows


if __name__ == "__main__":
    main()
