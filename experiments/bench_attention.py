"""Attention on one accelerator: our Pallas kernel vs cuDNN vs XLA, forward and forward+backward.

    python experiments/bench_attention.py                 # ViT shapes: 256 x 12 heads, D=64, bf16, N=50..1025
    python experiments/bench_attention.py --vit           # + ViT-B/16 train-step images/s per attention_impl
    python experiments/bench_attention.py --tune          # + sweep the Pallas tile sizes, report the best
    python experiments/bench_attention.py --smoke --vit   # CPU: tiny sizes in interpret mode (checks it runs)

Writes experiments/out/bench_attention.{md,json} (--smoke: bench_attention_smoke.{md,json}).
experiments/gpu_report.py runs the kernel cells (`bench_kernel_cell`) with everything else one GPU should measure.

How FLOPs are counted (the FlashAttention-2 convention, the same count for every implementation, so
TFLOP/s compare times at equal work): forward = 4*B*H*N*N*D (QK^T and PV, a multiply-add = 2 FLOPs);
backward = 2.5x forward (five N x N x D matmuls: QK^T recomputed, dV, dP, dQ, dK); forward+backward =
3.5x forward. Padded tiles and masked keys are not counted.

Timing: each measurement runs `--repeats` chained calls inside one jit (threaded through
`lax.optimization_barrier` so XLA can neither merge nor hoist them; that hides the ~10 us launch cost
that would otherwise dominate N=50), then reports the median over `--iters` timed calls after `--warmup`.
Goal (issue 5): Pallas at or above cuDNN at every N, and >= 1.5x XLA forward+backward from N=577.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiment_io import write_outputs  # noqa: E402
from vitjax.kernels import attention, dispatch  # noqa: E402

# Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s from the vendors' data sheets, matched against
# jax's device_kind (longest key first); "H100" alone is the SXM part (e.g. "NVIDIA H100 80GB HBM3").
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756, "H100 NVL": 835, "H100": 989.4, "H800": 989.4, "H200": 989.4, "GH200": 989.4,
    "B200": 2250, "A100": 312, "A800": 312, "L40S": 362, "L4": 121, "A10G": 70, "A10": 125,
    "RTX 4090": 165, "TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459,
    "TPU v6 lite": 918, "TPU v6e": 918,
}
IMPLS = ("pallas", "cudnn", "xla")
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def bf16_peak(device_kind: str):
    """Returns the dense bf16 peak TFLOP/s of a device kind, or None when unknown (e.g. a CPU)."""
    for name in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return BF16_PEAK_TFLOPS[name]
    return None


def attention_fn(impl: str, block_sizes=None):
    """Returns f(q, k, v) -> out for one implementation: what models run with that attention_impl."""
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}; valid choices: {IMPLS}")
    if impl == "pallas" and block_sizes is not None:
        return lambda q, k, v: attention.flash_attention(q, k, v, block_sizes=block_sizes)
    # Through the dispatch, so an impl that cannot run says why (e.g. cuDNN on a CPU) instead of running XLA.
    return lambda q, k, v: dispatch.dot_product_attention(q, k, v, impl=impl)


def chained(step, repeats: int):
    """Returns a function running `step(q, k, v, cotangent)` `repeats` times back to back, returning a scalar."""
    def run(q, k, v, cotangent):
        total = jnp.zeros((), jnp.float32)
        for _ in range(repeats):
            results = step(q, k, v, cotangent)
            # Each call consumes the previous call's barrier outputs: no CSE, no hoisting, strict order.
            q, k, v, results = lax.optimization_barrier((q, k, v, results))
            total = total + sum(r.reshape(-1)[0].astype(jnp.float32) for r in results)
        return total
    return run


def forward_step(fn):
    return lambda q, k, v, cotangent: (fn(q, k, v),)


def forward_backward_step(fn):
    def step(q, k, v, cotangent):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(cotangent))
    return step


def time_call(function, args, warmup: int, iters: int, repeats: int):
    """Returns (median seconds per inner call, compile seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / repeats, compile_seconds


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def make_inputs(batch, length, heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = (batch, length, heads, head_dim)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def check_against_xla(impl_fn, reference_fn, q, k, v, cotangent):
    """Returns max relative errors (forward, gradients) of impl vs the XLA path, on a slice of the batch."""
    q, k, v, cotangent = (x[:4] for x in (q, k, v, cotangent))
    impl = jax.jit(forward_backward_step(impl_fn))(q, k, v, cotangent)
    reference = jax.jit(forward_backward_step(reference_fn))(q, k, v, cotangent)
    return relative_error(impl[0], reference[0]), max(relative_error(a, b) for a, b in zip(impl[1:], reference[1:]))


def short_error(error: BaseException) -> str:
    """Returns "Type: first line of the message", cut to 200 characters: what a table cell can hold."""
    lines = str(error).strip().splitlines() or [""]
    # The reason comes first; the list of valid choices that follows it adds nothing in a table.
    reason = lines[0].split(" Valid choices:")[0]
    return f"{type(error).__name__}: {reason[:200]}"


def bench_kernel_cell(length: int, impl: str, *, batch: int, heads: int, head_dim: int, dtype, warmup: int,
                      iters: int, repeats: int, peak=None, block_sizes=None, inputs=None):
    """Returns one (N, impl) record: forward and forward+backward ms, TFLOP/s, % of peak, errors vs XLA.

    A failing impl gives a record with `error` (a short message) instead of raising.
    """
    dtype_name = jnp.dtype(dtype).name
    q, k, v, cotangent = inputs if inputs is not None else make_inputs(batch, length, heads, head_dim, dtype)
    forward_flops = 4.0 * batch * heads * length * length * head_dim
    record = dict(n=length, impl=impl, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype_name,
                  forward_flops=forward_flops)
    fn = attention_fn(impl, block_sizes)
    try:
        fwd, fwd_compile = time_call(chained(forward_step(fn), repeats), (q, k, v, cotangent), warmup, iters, repeats)
        fwd_bwd, fwd_bwd_compile = time_call(chained(forward_backward_step(fn), repeats), (q, k, v, cotangent),
                                             warmup, iters, repeats)
        error_fwd, error_grad = (check_against_xla(fn, attention_fn("xla"), q, k, v, cotangent)
                                 if impl != "xla" else (0.0, 0.0))
    except Exception as error:  # noqa: BLE001 -- an unavailable impl is a row, not a crash
        record["error"] = short_error(error)
        print(f"N={length} {impl}: unavailable ({record['error']})", flush=True)
        return record
    record.update(
        forward_ms=fwd * 1e3, forward_backward_ms=fwd_bwd * 1e3,
        forward_tflops=forward_flops / fwd / 1e12,
        forward_backward_tflops=3.5 * forward_flops / fwd_bwd / 1e12,
        compile_s=fwd_compile + fwd_bwd_compile,
        max_rel_error_forward=error_fwd, max_rel_error_grads=error_grad)
    if peak:
        record["forward_peak_fraction"] = record["forward_tflops"] / peak
        record["forward_backward_peak_fraction"] = record["forward_backward_tflops"] / peak
    print(f"N={length} {impl}: fwd {record['forward_ms']:.3f} ms ({record['forward_tflops']:.1f} TFLOP/s), "
          f"fwd+bwd {record['forward_backward_ms']:.3f} ms ({record['forward_backward_tflops']:.1f} TFLOP/s), "
          f"err fwd {error_fwd:.1e} grads {error_grad:.1e}", flush=True)
    return record


def bench_kernels(args, dtype, peak):
    """Returns one record per (N, impl) with times, TFLOP/s and errors vs XLA."""
    records = []
    block_sizes = parse_block_sizes(args.block_sizes)
    for length in args.n:
        inputs = make_inputs(args.batch, length, args.heads, args.head_dim, dtype)
        for impl in args.impls:
            records.append(bench_kernel_cell(length, impl, batch=args.batch, heads=args.heads,
                                             head_dim=args.head_dim, dtype=dtype, warmup=args.warmup,
                                             iters=args.iters, repeats=args.repeats, peak=peak,
                                             block_sizes=block_sizes, inputs=inputs))
    return records


def parse_block_sizes(text):
    """Returns BlockSizes from "bq,bk,bq_dkv,bk_dkv,bq_dq,bk_dq[,warps[,warps_bwd[,stages]]]", or None."""
    if not text:
        return None
    values = [int(x) for x in text.split(",")]
    names = [f.name for f in dataclasses.fields(attention.BlockSizes)]
    if not 6 <= len(values) <= len(names):
        raise ValueError(f"--block-sizes wants 6 to {len(names)} integers in the order {names}")
    return attention.BlockSizes(**dict(zip(names, values)))


def tune_pallas(args, dtype):
    """Returns, per N, the fastest forward tiles and backward tiles among a small sweep."""
    forward_grid = [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)]
    backward_grid = [(32, 64, 64, 32), (32, 128, 128, 32), (64, 64, 64, 64), (64, 128, 128, 64), (32, 32, 32, 32)]
    results = []
    for length in args.n:
        q, k, v, cotangent = make_inputs(args.batch, length, args.heads, args.head_dim, dtype)
        best = {}
        for warps in (4, 8):
            for block_q, block_k in forward_grid:
                tiles = attention.BlockSizes(block_q=block_q, block_k=block_k, num_warps=warps)
                try:
                    seconds, _ = time_call(chained(forward_step(attention_fn("pallas", tiles)), args.repeats),
                                           (q, k, v, cotangent), args.warmup, args.iters, args.repeats)
                except Exception as error:  # noqa: BLE001
                    print(f"tune N={length} fwd {block_q}x{block_k} w{warps}: failed ({type(error).__name__})")
                    continue
                if seconds < best.get("forward_ms", np.inf) / 1e3:
                    best.update(forward_ms=seconds * 1e3, forward=(block_q, block_k, warps))
        block_q, block_k, warps = best.get("forward", (None, None, None))
        for warps_backward in (4, 8):
            for bq_dkv, bk_dkv, bq_dq, bk_dq in backward_grid:
                tiles = attention.BlockSizes(block_q=block_q, block_k=block_k, num_warps=warps,
                                             block_q_dkv=bq_dkv, block_k_dkv=bk_dkv, block_q_dq=bq_dq,
                                             block_k_dq=bk_dq, num_warps_backward=warps_backward)
                try:
                    seconds, _ = time_call(chained(forward_backward_step(attention_fn("pallas", tiles)),
                                                   args.repeats),
                                           (q, k, v, cotangent), args.warmup, args.iters, args.repeats)
                except Exception as error:  # noqa: BLE001
                    print(f"tune N={length} bwd {bq_dkv},{bk_dkv},{bq_dq},{bk_dq} w{warps_backward}: failed "
                          f"({type(error).__name__})")
                    continue
                if seconds < best.get("forward_backward_ms", np.inf) / 1e3:
                    best.update(forward_backward_ms=seconds * 1e3,
                                backward=(bq_dkv, bk_dkv, bq_dq, bk_dq, warps_backward))
        best["n"] = length
        print(f"tune N={length}: {best}", flush=True)
        results.append(best)
    return results


def bench_vit(args):
    """Returns ViT-B/16 train-step images/s per attention_impl (bf16 compute, fp32 params, AdamW)."""
    import optax

    from vitjax import models

    overrides = dict(dtype=jnp.bfloat16)
    if args.smoke:
        overrides.update(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    image_size = overrides.get("img_size", 224)
    num_classes = overrides.get("num_classes", 1000)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.vit_batch, image_size, image_size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, num_classes, args.vit_batch))
    records = []
    for impl in args.vit_impls:
        model = models.create("vit_base_patch16_224", attention_impl=impl, **overrides)
        optimizer = optax.adamw(1e-4, weight_decay=0.05)

        def train_step(params, opt_state, images, labels, model=model, optimizer=optimizer):
            def loss_fn(params):
                logits, _ = model.apply({"params": params}, images, train=True,
                                        rngs={"dropout": jax.random.PRNGKey(1), "drop_path": jax.random.PRNGKey(2)})
                return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        step = jax.jit(train_step, donate_argnums=(0, 1))
        try:
            # An impl that cannot run these shapes raises here, while tracing, with the reason.
            params = jax.jit(lambda model=model: model.init(jax.random.PRNGKey(0), images[:1], train=False)["params"])()
            opt_state = optimizer.init(params)
            for _ in range(args.warmup):
                params, opt_state, loss = step(params, opt_state, images, labels)
            jax.block_until_ready(loss)
            start = time.perf_counter()
            for _ in range(args.vit_steps):
                params, opt_state, loss = step(params, opt_state, images, labels)
            jax.block_until_ready(loss)
            seconds = (time.perf_counter() - start) / args.vit_steps
        except Exception as error:  # noqa: BLE001
            records.append(dict(impl=impl, error=short_error(error)))
            continue
        records.append(dict(impl=impl, batch=args.vit_batch, step_ms=seconds * 1e3,
                            images_per_second=args.vit_batch / seconds, final_loss=float(loss)))
        print(f"ViT-B/16 {impl}: {seconds * 1e3:.1f} ms/step, {args.vit_batch / seconds:.1f} images/s", flush=True)
    return records


def markdown(args, device_kind, peak, records, vit_records, tune_records):
    """Returns the markdown report."""
    lines = [f"# Attention kernels: {device_kind}", "",
             f"B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}; bf16 peak "
             f"{peak if peak else 'unknown'} TFLOP/s; jax {jax.__version__}."
             + (" CPU smoke run: Pallas in interpret mode, timings meaningless." if args.smoke else ""),
             "FLOPs: forward 4BHN^2D; forward+backward 3.5x that (FlashAttention-2 convention).", "",
             "| N | impl | fwd ms | fwd TFLOP/s | fwd % peak | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd % peak "
             "| err vs xla (out / grads) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    by_key = {(r["n"], r["impl"]): r for r in records}
    for r in records:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['impl']} | n/a | | | | | | {r['error'][:160]} |")
            continue
        peak_fwd = f"{100 * r['forward_peak_fraction']:.1f}" if peak else ""
        peak_all = f"{100 * r['forward_backward_peak_fraction']:.1f}" if peak else ""
        lines.append(f"| {r['n']} | {r['impl']} | {r['forward_ms']:.3f} | {r['forward_tflops']:.1f} | {peak_fwd} | "
                     f"{r['forward_backward_ms']:.3f} | {r['forward_backward_tflops']:.1f} | {peak_all} | "
                     f"{r['max_rel_error_forward']:.1e} / {r['max_rel_error_grads']:.1e} |")
    lines += ["", "Pallas speed-up (time ratio; > 1 means Pallas is faster):", "",
              "| N | vs cuDNN fwd | vs cuDNN fwd+bwd | vs XLA fwd | vs XLA fwd+bwd |", "|---:|---:|---:|---:|---:|"]
    for length in args.n:
        pallas = by_key.get((length, "pallas"), {})
        cells = []
        for other in ("cudnn", "xla"):
            baseline = by_key.get((length, other), {})
            for key in ("forward_ms", "forward_backward_ms"):
                ok = key in pallas and key in baseline
                cells.append(f"{baseline[key] / pallas[key]:.2f}x" if ok else "n/a")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    if tune_records:
        lines += ["", "Pallas tile sweep (forward: block_q, block_k, warps; backward: q/k tiles of the dK/dV and dQ "
                  "kernels, warps):", "",
                  "| N | forward | fwd ms | backward | fwd+bwd ms |", "|---:|---|---:|---|---:|"]
        for t in tune_records:
            lines.append(f"| {t['n']} | {t.get('forward')} | {t.get('forward_ms', float('nan')):.3f} | "
                         f"{t.get('backward')} | {t.get('forward_backward_ms', float('nan')):.3f} |")
    if vit_records:
        lines += ["", f"ViT-B/16 train step (batch {args.vit_batch}, bf16 compute, AdamW):", "",
                  "| attention_impl | ms / step | images/s |", "|---|---:|---:|"]
        for r in vit_records:
            if "error" in r:
                lines.append(f"| {r['impl']} | n/a | {r['error'][:160]} |")
            else:
                lines.append(f"| {r['impl']} | {r['step_ms']:.1f} | {r['images_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[50, 197, 577, 1025], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--block-sizes", default="", help="Pallas tiles: bq,bk,bq_dkv,bk_dkv,bq_dq,bk_dq[,warps,...]")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10, help="chained calls per timed jit call")
    parser.add_argument("--tune", action="store_true", help="sweep Pallas tile sizes")
    parser.add_argument("--vit", action="store_true", help="also time a ViT-B/16 train step per attention_impl")
    parser.add_argument("--vit-batch", type=int, default=128)
    parser.add_argument("--vit-steps", type=int, default=20)
    parser.add_argument("--vit-impls", nargs="+", default=["xla", "pallas", "cudnn"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpret mode)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.batch, args.heads, args.head_dim = [50, 77], 1, 2, 32
        args.warmup, args.iters, args.repeats = 1, 2, 2
        args.vit_batch, args.vit_steps = 2, 2
    dtype = DTYPES[args.dtype]
    device_kind = jax.devices()[0].device_kind
    peak = bf16_peak(device_kind)
    print(f"device: {device_kind} (platform {jax.default_backend()}), bf16 peak: {peak} TFLOP/s", flush=True)

    records = bench_kernels(args, dtype, peak)
    tune_records = tune_pallas(args, dtype) if args.tune else []
    vit_records = bench_vit(args) if args.vit else []

    report = markdown(args, device_kind, peak, records, vit_records, tune_records)
    print(report)
    stem = write_outputs(args.out, "bench_attention_smoke" if args.smoke else "bench_attention", report,
                         dict(device_kind=device_kind, platform=jax.default_backend(), bf16_peak_tflops=peak,
                              jax_version=jax.__version__, args=vars(args), kernels=records, tune=tune_records,
                              vit=vit_records))
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
