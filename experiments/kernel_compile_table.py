r"""The Pallas kernels compiled for real TPUs (v4, v5e, v5p) and for Hopper (sm_90a) on this CPU host, and what the dispatcher allows.

    python experiments/kernel_compile_table.py --out experiments/out      # every case, about 10 minutes
    python experiments/kernel_compile_table.py --quick --out /tmp         # one head dim per dtype
    python experiments/kernel_compile_table.py --quick --stem kernel_compile_before   # run before the fixes
    python experiments/kernel_compile_table.py --target gpu               # sm_90a -> kernel_compile_gpu.{md,json}
    python experiments/kernel_compile_table.py --vmem                     # -> kernel_compile_vmem.{md,json}

Each case is the attention kernel's forward and backward (`jax.grad` through `flash_attention`), or the
ToMe merge kernel's forward, compiled with Mosaic by the TPU compiler in libtpu (`vitjax.aot.compile_on_chip`,
one chip of the topology; needs the `aot` extra). Next to the outcome stands what the dispatcher says for
the same operands on a TPU (`dispatch.unsupported_reason("pallas", ...)` / `tome_merge.unsupported_reason`):
a case the dispatcher allows must compile; one that does not compile must be refused, with its reason.
Writes experiments/out/kernel_compile_table.{md,json}.

With `--vmem` a few attention cases (forward + backward) are compiled for a v5e again and again with a
smaller scoped VMEM limit each time (`vitjax.aot.mosaic_vmem_needed`, bisection in 16 KiB steps): the
smallest limit that compiles is the VMEM the largest kernel needs as the TPU compiler plans it, next to
the dispatcher's estimate (`attention.mosaic_vmem_bytes`).

With `--target gpu` the same cases lower with Pallas' Triton backend and each Triton kernel goes through
the `triton` package's compiler to a cubin for sm_90a (`vitjax.aot.compile_for_gpu`: no GPU needed): the
table gives per case the dispatcher's verdict for a GPU, the largest shared memory of its kernels against
Hopper's 227 KB per block, the most registers per thread, and the bytes of spill stores and loads ptxas
reports (summed over the case's kernels). XLA itself compiles
these kernels with the Triton inside jaxlib, so these are close figures, not XLA's own.
"""
import argparse
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

from vitjax import aot  # noqa: E402
from vitjax.kernels import attention, common, dispatch, tome_merge  # noqa: E402

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1"}
DEVICE_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5"}
DTYPES = ("float32", "bfloat16", "float16")
BATCH, HEADS = 2, 2


def _gpu_reason(check):
    """Returns check() evaluated as on a GPU (the dispatcher's verdict there)."""
    with common.target_platform("gpu"):
        return check()


def attention_case(dtype, length, head_dim, bias_kind):
    """Returns (loss function, abstract args, dispatcher's reason or None) of one attention case."""
    token = jax.ShapeDtypeStruct((BATCH, length, HEADS, head_dim), jnp.dtype(dtype))
    args = [token, token, token]
    if bias_kind == "full":
        args.append(jax.ShapeDtypeStruct((1, HEADS, length, length), jnp.float32))
    elif bias_kind == "key":
        args.append(jax.ShapeDtypeStruct((BATCH, length), jnp.float32))

    def attend(q, k, v, *extra):
        bias = extra[0] if bias_kind == "full" else None
        key_bias = extra[0] if bias_kind == "key" else None
        return attention.flash_attention(q, k, v, bias=bias, key_bias=key_bias)

    def loss(*operands):
        return attend(*operands).astype(jnp.float32).sum()

    function = jax.grad(loss, argnums=tuple(range(len(args))))
    extra = args[3:]

    def reason(device_kind):
        def check():
            return dispatch.unsupported_reason(
                "pallas", *args[:3], bias=extra[0] if bias_kind == "full" else None,
                key_bias=extra[0] if bias_kind == "key" else None)
        if device_kind == "gpu":
            return _gpu_reason(check)
        with common.target_platform("tpu", device_kind):
            return check()
    return function, args, reason


def merge_case(dtype, tokens, channels=384, r=16):
    """Returns (merge function, abstract args, dispatcher's reason or None) of one ToMe merge case."""
    x = jax.ShapeDtypeStruct((BATCH, tokens, channels), jnp.dtype(dtype))
    metric = jax.ShapeDtypeStruct((BATCH, tokens, 64), jnp.dtype(dtype))
    sizes = jax.ShapeDtypeStruct((BATCH, tokens), jnp.float32)

    def function(x, metric, sizes):
        return tome_merge.merge_pallas(x, metric, sizes, r)

    def reason(device_kind):
        if device_kind == "gpu":
            return _gpu_reason(lambda: tome_merge.unsupported_reason(x, metric))
        with common.target_platform("tpu", device_kind):
            return tome_merge.unsupported_reason(x, metric)
    return function, [x, metric, sizes], reason


def cases(quick: bool):
    """Yields (kernel, settings dict, builder) for every case of the table."""
    head_dims = (64,) if quick else (64, 128, 256)
    for dtype, head_dim, bias_kind in itertools.product(DTYPES, head_dims, ("none", "full", "key")):
        settings = dict(dtype=dtype, length=197, head_dim=head_dim, bias=bias_kind)
        yield "attention fwd+bwd", settings, lambda s=settings: attention_case(s["dtype"], s["length"], s["head_dim"],
                                                                               s["bias"])
    for length, bias_kind in itertools.product((4096, 8192, 16384), ("none", "full")):
        settings = dict(dtype="bfloat16", length=length, head_dim=64, bias=bias_kind)
        yield "attention fwd+bwd", settings, lambda s=settings: attention_case(s["dtype"], s["length"], s["head_dim"],
                                                                               s["bias"])
    for dtype, tokens in itertools.product(DTYPES, (197, 577)):
        settings = dict(dtype=dtype, length=tokens, head_dim="", bias="")
        yield "ToMe merge", settings, lambda s=settings: merge_case(s["dtype"], s["length"])


def markdown(rows):
    """Returns the table: one line per case, one column per TPU generation."""
    lines = ["| kernel | dtype | N | head dim | bias | " + " | ".join(TOPOLOGIES) + " |",
             "|---|---|---:|---:|---|" + "---|" * len(TOPOLOGIES)]
    allowed = broken = 0
    for row in rows:
        cells = []
        for generation in TOPOLOGIES:
            result = row["results"][generation]
            refusal = result.get("dispatcher")
            compiled = ("" if result["ok"] is None else f"ok ({result['seconds']:.0f} s)" if result["ok"]
                        else f"**fails**: {result['error'][:110]}")
            if refusal:
                # flash_attention / merge_pallas refuse it themselves: only the before-table shows the compiler.
                cells.append(f"refused: {refusal.split(' (')[0][:70]}")
            else:
                allowed += 1
                broken += not result["ok"]
                cells.append(compiled)
        lines.append(f"| {row['kernel']} | {row['dtype']} | {row['length']} | {row['head_dim']} | {row['bias']} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Cases (kernel x generation) the dispatcher allows: {allowed}; of them fail to compile: {broken}. "
                 f"Refused: {sum(len(row['results']) for row in rows) - allowed} (not compiled here: the kernels "
                 "refuse them too; kernel_compile_before.md has the TPU compiler's verdict on them).")
    return "\n".join(lines)


def gpu_markdown(rows):
    """Returns the sm_90a table: one line per case with its kernels' largest shared memory, registers, spills."""
    limit = aot.GPU_SHARED_BYTES[90] // 1024
    lines = ["| kernel | dtype | N | head dim | bias | sm_90a | shared memory (KB, of %d) | registers (of %d) "
             "| spill stores + loads (bytes) | compile (s) |" % (limit, aot.GPU_MAX_REGISTERS),
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
    allowed = broken = spilling = 0
    for row in rows:
        result = row["result"]
        head = f"| {row['kernel']} | {row['dtype']} | {row['length']} | {row['head_dim']} | {row['bias']} | "
        if result.get("dispatcher"):
            lines.append(head + f"refused: {result['dispatcher'].split(' (')[0][:90]} | | | | |")
            continue
        allowed += 1
        kernels = result["kernels"]
        compiled = [kernel for kernel in kernels if "shared_bytes" in kernel]
        broken += not result["ok"]
        spills = sum(kernel["spill_bytes"] for kernel in compiled)
        spilling += spills > 0
        verdict = "ok" if result["ok"] else f"**fails**: {(result['error'] or '')[:100]}"
        shared = max((kernel["shared_bytes"] for kernel in compiled), default=0) / 1024
        registers = max((kernel["registers"] for kernel in compiled), default=0)
        lines.append(head + f"{verdict} | {shared:.0f} | {registers} | {spills} | {result['seconds']:.0f} |")
    lines.append("")
    lines.append(f"Cases the dispatcher allows on a GPU: {allowed}; of them fail to fit sm_90a: {broken}; with register "
                 f"spills: {spilling}. Refused: {len(rows) - allowed} (not compiled: the kernels refuse them too).")
    return "\n".join(lines)


def run_gpu(args):
    """Compiles every case's Triton kernels for sm_90a and writes OUT/kernel_compile_gpu.{md,json}."""
    rows = []
    start = time.time()
    for kernel, settings, build in cases(args.quick):
        function, abstract_args, reason = build()
        refusal = reason("gpu")
        result = (aot.compile_for_gpu(function, abstract_args, capability=90) if not refusal
                  else dict(ok=None, seconds=0.0, kernels=[], error=None))
        rows.append(dict(kernel=kernel, **settings, result=dict(result, dispatcher=refusal)))
        print(kernel, settings, result["ok"], refusal and refusal[:60], result["error"] and result["error"][:160],
              f"{result['seconds']:.0f} s", flush=True)
    table = gpu_markdown(rows)
    print(table)
    print(f"{len(rows)} cases in {time.time() - start:.0f} s")
    write_outputs(args.out, args.stem or "kernel_compile_gpu", table, rows)


VMEM_CASES = [("bfloat16", 197, 64, "none"), ("bfloat16", 197, 64, "full"), ("bfloat16", 16384, 64, "none"),
              ("bfloat16", 16384, 64, "full"), ("bfloat16", 16384, 128, "key"), ("float32", 197, 256, "full"),
              ("bfloat16", 197, 256, "full")]


def run_vmem(args):
    """Writes OUT/kernel_compile_vmem.{md,json}: the compiler's VMEM need per case against the estimate."""
    rows = []
    for dtype, length, head_dim, bias_kind in VMEM_CASES:
        function, abstract_args, _ = attention_case(dtype, length, head_dim, bias_kind)
        start = time.time()
        needed = aot.mosaic_vmem_needed(function, abstract_args, TOPOLOGIES["v5e"])
        estimate = attention.mosaic_vmem_bytes(length, length, head_dim, dtype, bias=bias_kind == "full",
                                               key_bias=bias_kind == "key")
        rows.append(dict(dtype=dtype, length=length, head_dim=head_dim, bias=bias_kind, needed_bytes=needed,
                         estimate_bytes=estimate, seconds=time.time() - start))
        print(rows[-1], flush=True)
    lines = ["| dtype | N | head dim | bias | VMEM needed, v5e compiler (KiB) | estimate (KiB) |",
             "|---|---:|---:|---|---:|---:|"]
    for row in rows:
        needed = "does not compile" if row["needed_bytes"] is None else f"{row['needed_bytes'] / 1024:.0f}"
        lines.append(f"| {row['dtype']} | {row['length']} | {row['head_dim']} | {row['bias']} | {needed} | "
                     f"{row['estimate_bytes'] / 1024:.0f} |")
    table = "\n".join(lines)
    print(table)
    write_outputs(args.out, args.stem or "kernel_compile_vmem", table, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stem", default=None, help="output name (default kernel_compile_table, or _gpu)")
    parser.add_argument("--target", default="tpu", choices=("tpu", "gpu"))
    parser.add_argument("--redraw", action="store_true", help="rewrite the table from OUT/STEM.json, no compiling")
    parser.add_argument("--vmem", action="store_true", help="the compiler's VMEM need of a few attention cases")
    args = parser.parse_args()
    if args.vmem:
        return run_vmem(args)
    if args.target == "gpu":
        return run_gpu(args)
    args.stem = args.stem or "kernel_compile_table"
    if args.redraw:
        import json
        with open(os.path.join(args.out, args.stem + ".json")) as file:
            rows = json.load(file)
        for row in rows:
            for result in row["results"].values():
                if result.get("dispatcher"):
                    result.update(ok=None, error=None)
        write_outputs(args.out, args.stem, markdown(rows), rows)
        return
    rows = []
    start = time.time()
    for kernel, settings, build in cases(args.quick):
        function, abstract_args, reason = build()
        row = dict(kernel=kernel, **settings, results={})
        for generation, topology in TOPOLOGIES.items():
            refusal = reason(DEVICE_KINDS[generation])
            # The kernels refuse what the dispatcher refuses, so a refused case is not compiled here; the
            # compiler's own verdict on those is in kernel_compile_before.md (before the refusals existed).
            result = (aot.compile_on_chip(function, abstract_args, topology) if not refusal
                      else dict(ok=None, seconds=0.0, error=None))
            row["results"][generation] = dict(result, dispatcher=refusal)
        rows.append(row)
        print(kernel, settings, {g: (r["ok"], r["dispatcher"] and r["dispatcher"][:60], r["error"] and r["error"][:80])
                                 for g, r in row["results"].items()}, flush=True)
    table = markdown(rows)
    print(table)
    print(f"{len(rows) * len(TOPOLOGIES)} compiles in {time.time() - start:.0f} s")
    write_outputs(args.out, args.stem, table, rows)


if __name__ == "__main__":
    main()
