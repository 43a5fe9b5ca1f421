r"""What the Pallas attention kernel keeps between forward and backward on a TPU, compiled ahead of time.

    python experiments/attention_residual_table.py --out experiments/out    # -> attention_residual.{md,json}

Compiles (for one chip of a v5e, `vitjax.aot.compile_on_chip`, no TPU needed) the gradient of a stack of
attention layers, each feeding the next through a small projection so that every layer's residuals
(q, k, v, out and the log-sum-exp) must live until its backward runs, and reads the compiled program's
temporary memory. Each case also names the lse residual's own bytes as the TPU lays it out in HBM: an
(..., N, 1) fp32 column is tiled (8, 128) and fills a whole 128-lane row per value, the compact
(..., 1, N) row is tiled (1, 128). Run it on a tree before and after a kernel change (`--stem`) to compare.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

from vitjax import aot  # noqa: E402
from vitjax.kernels import attention  # noqa: E402

# (layers, batch, heads, N, head dim): the README's earlier measurement, and a ViT-B/16-like layer at 224 px.
CASES = [(4, 64, 12, 256, 64), (4, 64, 12, 197, 64)]


def stacked_attention_grad(layers, heads, head_dim, impl):
    """Returns grad of sum(out) over `layers` attention layers (bf16), wrt the input and every projection."""
    def loss(x, *projections):
        batch, length, width = x.shape
        for projection in projections:
            qkv = jnp.einsum("bnc,cd->bnd", x, projection).reshape(batch, length, 3, heads, head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            if impl == "pallas":
                out = attention.flash_attention(q, k, v)
            else:
                out = attention.attention_reference(q, k, v)
            x = out.reshape(batch, length, width)
        return x.astype(jnp.float32).sum()
    return jax.grad(loss, argnums=tuple(range(layers + 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--stem", default="attention_residual")
    parser.add_argument("--topology", default="v5e:2x2")
    args = parser.parse_args()
    rows = []
    for layers, batch, heads, length, head_dim in CASES:
        width = heads * head_dim
        x = jax.ShapeDtypeStruct((batch, length, width), jnp.bfloat16)
        projections = [jax.ShapeDtypeStruct((width, 3 * width), jnp.bfloat16)] * layers
        for impl in ("pallas", "xla"):
            result = aot.compile_on_chip(stacked_attention_grad(layers, heads, head_dim, impl), [x, *projections],
                                         args.topology)
            padded = -(-length // 128) * 128
            rows.append(dict(impl=impl, layers=layers, batch=batch, heads=heads, length=length, head_dim=head_dim,
                             ok=result["ok"], error=result["error"], temp_bytes=result.get("temp_bytes"),
                             lse_column_bytes=batch * heads * padded * 128 * 4,
                             lse_row_bytes=batch * heads * padded * 4))
            print(rows[-1], flush=True)
    lines = [f"Gradient of a stack of attention layers (bf16), compiled for one chip of {args.topology}.", "",
             "| impl | layers | batch | heads | N | head dim | temporary memory (MB) | lse per layer as (N, 1) column "
             "/ as (1, N) row (MB) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        memory = f"{row['temp_bytes'] / 1e6:.1f}" if row["ok"] else f"fails: {row['error'][:80]}"
        lines.append(f"| {row['impl']} | {row['layers']} | {row['batch']} | {row['heads']} | {row['length']} | "
                     f"{row['head_dim']} | {memory} | {row['lse_column_bytes'] / 1e6:.1f} / "
                     f"{row['lse_row_bytes'] / 1e6:.2f} |")
    table = "\n".join(lines)
    print(table)
    write_outputs(args.out, args.stem, table, rows)


if __name__ == "__main__":
    main()
