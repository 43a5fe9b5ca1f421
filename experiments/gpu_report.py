r"""Every benchmark that needs a GPU, on one GPU, in one markdown table: experiments/out/gpu_report.md.

The command for a GPU session (run it first; it ends itself --hard-limit seconds after it starts, 555 by
default, so a 600 s command limit never cuts it off, and it rewrites the report after every cell):

    PYTHONUNBUFFERED=1 python experiments/gpu_report.py --out "$OUT" 2>&1 | tee "$OUT/gpu_report.log"

then copy $OUT/gpu_report.{md,json} (and the log) to experiments/out/ and commit them.
    python experiments/gpu_report.py --smoke     # CPU, tiny sizes, about a minute: proves it runs end to end

Sections, in this order, each with a share of the --budget seconds (time a section leaves unused passes
on; a cell that would not fit its section's time, as long as the longest cell so far, is skipped with a note):
1. attention: per N = 197, 577, 1025 (B=128 x 12 heads, ViT-B; head dim 64; bf16): pallas, cudnn, xla, forward
   and forward+backward: ms, TFLOP/s and % of the chip's dense bf16 peak (FLOPs: 4BHN^2D forward, 3.5x that
   forward+backward, the FlashAttention-2 count; `bench_attention.bench_kernel_cell`), and the max relative
   error of each against xla (a 4-image slice). Then the cells the Hopper plan (README) still needs shown
   on hardware: N = 577 at head dim 128 (pallas vs cudnn) and in fp32 (pallas vs xla).
2. ViT-B/16 supervised train step (the trainer's own jitted step: forward, backward, AdamW), 224 px, batch
   256, bf16 compute, fp32 master weights, attention_impl xla / pallas / cudnn: images/s and MFU (model
   FLOPs = the analytic 3x forward count, multiply-add = 2; XLA's cost-analysis count of the compiled step
   is noted beside it: it counts custom calls such as cuDNN's and Pallas' as 0).
3. MAE ViT-B/16 train step, mask 0.75, and the same MAE encoding every patch (mask 0): images/s and their
   ratio (paper: about 3x; README, CPU, small ViT: 2.5x, and 2.06x the supervised step; the analytic FLOP
   ratio is 2.35x for ViT-B/16 with the 512 x 8 decoder, whose cost both arms pay in full).
   Sections 2 and 3 run `bench_mae.ArmRunner`.
4. ToMe inference (random weights, bf16, batch 256): ViT-B/16 at r = 0, 8, 16 and ViT-L/16 at r = 0, 8,
   jnp vs Pallas merge: images/s and speed-up over r = 0 (`bench_tome.ModelBench`).
5. int8 inference (random weights, batch 256): ViT-B/16 in bf16 vs its Dense matmuls in int8 through qwix
   (`vitjax.quant.int8`): images/s, int8 / bf16 ratio, the logits' difference (`int8_bench.Int8Bench`).

Each section runs in a child process that alone touches the GPU, cell after cell. A cell that raises
writes its short error in its cell; a cell that kills its process or leaves the GPU unusable (a crash, an
illegal memory access) is reported as such, and a fresh process goes on with the next cell.

Writes OUT/gpu_report.md (the table, headed by the device, jax/jaxlib versions and the date) and
OUT/gpu_report.json (raw figures, settings, skipped cells, `jax.print_environment_info`); --smoke writes
gpu_report_smoke.{md,json}. Exit status 0 when it finished (skips included), 2 when --hard-limit stopped it
(the report says where).

Needs jax, flax, optax, orbax, absl and numpy, plus ml_collections for sections 2 and 3 (the trainer's
config); synthetic data, no TensorFlow. Without ml_collections the cells of those two sections say so and
the others run. It is pure Python, so a machine that cannot pip install can take this machine's copy: an
untracked experiments/.vendor/ travels with the working tree, and this script appends it to sys.path:
    mkdir -p experiments/.vendor && cp -r \
        "$(python -c 'import ml_collections, os; print(os.path.dirname(ml_collections.__file__))')" experiments/.vendor/
"""
import argparse
import datetime
import gc
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(EXPERIMENTS))
sys.path.insert(0, EXPERIMENTS)
# Last: a copy of a pure-Python dependency for a machine without it (see the docstring); installed ones win.
sys.path.append(os.path.join(EXPERIMENTS, ".vendor"))

# The parent process imports jax but never starts a backend: on a GPU that would claim its memory.
import jax  # noqa: E402

from bench_attention import short_error  # noqa: E402
from experiment_io import write_outputs  # noqa: E402

OUT_DIR = os.path.join(EXPERIMENTS, "out")
SECTIONS = ("attention", "train", "mae", "tome", "int8")
LABELS = {"attention": "attention", "train": "train step", "mae": "MAE train step", "tome": "ToMe",
          "int8": "int8 inference"}
# Shares of the budget, and what one cell is expected to take before any has run (a GPU compile dominates).
SHARES = {"attention": 0.25, "train": 0.3, "mae": 0.2, "tome": 0.25, "int8": 0.1}
FIRST_CELL_SECONDS = {"attention": 15.0, "train": 45.0, "mae": 45.0, "tome": 20.0, "int8": 30.0}

# Cells run in the order listed, so what matters most comes first should the budget run out: per N our
# kernel, then cuDNN, then XLA (the slowest to run at N=1025, and the least in doubt).
FULL = dict(
    attention=dict(n=(197, 577, 1025), batch=128, heads=12, head_dim=64, dtype="bfloat16",
                   impls=("pallas", "cudnn", "xla"), warmup=2, iters=5, repeats=5,
                   # The Hopper plan (README, "Pod scale and hardware readiness") to confirm on the GPU: cuDNN
                   # ahead of the Pallas Triton kernel at head dim 128, and XLA ahead of it in fp32 (where
                   # `auto` now sends fp32). (N, head dim, dtype, impls), run after the cells above.
                   extra=((577, 128, "bfloat16", ("pallas", "cudnn")), (577, 64, "float32", ("pallas", "xla")))),
    # "gpu": bench_mae.GPU_RECIPE (ViT-B/16, 224 px, batch 256, bf16; MAE decoder 512 x 8).
    train=dict(recipe="gpu", label="ViT-B/16, 224 px, batch 256, bfloat16", impls=("xla", "pallas", "cudnn"),
               warmup=2, steps=5, repeats=3),
    mae=dict(recipe="gpu", label="ViT-B/16, 224 px, batch 256, bfloat16, decoder 512 x 8", warmup=2, steps=5,
             repeats=3),
    tome=dict(models={"vit_base_patch16_224": (0, 8, 16), "vit_large_patch16_224": (0, 8)}, overrides={},
              batch=256, dtype="bfloat16", iters=5, repeats=2),
    int8=dict(model="vit_base_patch16_224", overrides={}, batch=256, iters=5, repeats=2),
)
SMOKE_RECIPE = dict(model=dict(variant="Ti/16", embed_dim=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
                               img_size=32),
                    decoder=dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
                    batch_size=8, dtype="bfloat16", num_classes=10)
SMOKE = dict(
    attention=dict(n=(24,), batch=1, heads=2, head_dim=32, dtype="bfloat16", impls=("pallas", "cudnn", "xla"),
                   warmup=1, iters=1, repeats=1),
    train=dict(recipe=SMOKE_RECIPE, label="ViT width 32 depth 1, 32 px, batch 8, bfloat16",
               impls=("xla", "pallas", "cudnn"), warmup=1, steps=1, repeats=1),
    mae=dict(recipe=SMOKE_RECIPE, label="ViT width 32 depth 1, 32 px, batch 8, bfloat16, decoder 32 x 1", warmup=1,
             steps=1, repeats=1),
    tome=dict(models={"vit_tiny_patch16_224": (0, 4)},
              overrides=dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
              batch=2, dtype="bfloat16", iters=1, repeats=1),
    int8=dict(model="vit_tiny_patch16_224", overrides=dict(img_size=32, patch_size=8, depth=1, embed_dim=32,
                                                           num_heads=2), batch=2, iters=1, repeats=1),
)
MAE_ARMS = (("mae", 0.75), ("mae_all_tokens", 0.0))


# ------------------------------------------------------------------------------------------------
# FLOPs and formatting
# ------------------------------------------------------------------------------------------------

def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Returns the forward FLOPs of `depth` pre-norm blocks on one sequence (qkv, proj, MLP, QK^T and PV)."""
    dense = 2.0 * tokens * (4 * width * width + 2 * width * mlp_dim)
    attention = 4.0 * tokens * tokens * width
    return depth * (dense + attention)


def vit_forward_flops(model: Dict[str, Any], num_classes: int) -> float:
    """Returns one image's forward FLOPs of a cls-token ViT: patch embedding, blocks, linear head."""
    width, patch = model["embed_dim"], model["patch_size"]
    patches = (model["img_size"] // patch) ** 2
    embed = 2.0 * patches * 3 * patch * patch * width
    return embed + transformer_flops(patches + 1, width, model["depth"], model["mlp_dim"]) + 2.0 * width * num_classes


def mae_forward_flops(model: Dict[str, Any], decoder: Dict[str, Any], mask_ratio: float) -> float:
    """Returns one image's forward FLOPs of MAE: embedding, encoder on the visible patches + cls, decoder."""
    width, patch = model["embed_dim"], model["patch_size"]
    patches = (model["img_size"] // patch) ** 2
    visible = int(patches * (1 - mask_ratio)) + 1
    decoder_width = decoder["decoder_embed_dim"]
    return (2.0 * patches * 3 * patch * patch * width
            + transformer_flops(visible, width, model["depth"], model["mlp_dim"])
            + 2.0 * visible * width * decoder_width
            + transformer_flops(patches + 1, decoder_width, decoder["decoder_depth"], 4 * decoder_width)
            + 2.0 * patches * decoder_width * 3 * patch * patch)


def model_settings(recipe: Dict[str, Any]) -> Dict[str, Any]:
    """Returns the recipe's model settings with its variant's defaults filled in."""
    from vitjax.models.vit import decode_variant
    return {**decode_variant(recipe["model"]["variant"]), **recipe["model"]}


def fmt(value: float) -> str:
    """Returns a figure with one decimal from 10 up, three significant digits below (tiny smoke-run numbers)."""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def percent(fraction: Optional[float]) -> str:
    """Returns a fraction as "12.3%", or "" when there is none."""
    return "" if fraction is None or not math.isfinite(fraction) else f"{100 * fraction:.1f}%"


# ------------------------------------------------------------------------------------------------
# Cells: the same list in the parent (which reports them) and the child (which measures them)
# ------------------------------------------------------------------------------------------------

def section_cells(name: str, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Returns the cells of a section in run order, each with the `setting` and `impl` its row shows."""
    if name == "attention":
        shape = f"B{settings['batch']} H{settings['heads']} D{settings['head_dim']} {settings['dtype']}"
        cells = [dict(n=n, impl=impl, setting=f"N={n}, {shape}") for n in settings["n"] for impl in settings["impls"]]
        for n, head_dim, dtype, impls in settings.get("extra", ()):
            cells += [dict(n=n, impl=impl, head_dim=head_dim, dtype=dtype,
                           setting=f"N={n}, B{settings['batch']} H{settings['heads']} D{head_dim} {dtype}")
                      for impl in impls]
        return cells
    if name == "train":
        setting = f"{settings['label']}: supervised, the trainer's step, bf16 compute, fp32 weights, AdamW"
        return [dict(impl=impl, setting=setting) for impl in settings["impls"]]
    if name == "mae":
        return [dict(arm=arm, mask_ratio=mask_ratio, impl="xla", setting=f"{settings['label']}: mask {mask_ratio}")
                for arm, mask_ratio in MAE_ARMS]
    if name == "tome":
        return [dict(model=model, r=r, merge_impl=impl, impl=f"{impl} merge" if r else "-",
                     setting=f"{model} inference, batch {settings['batch']}, {settings['dtype']}, r={r}")
                for model, rs in settings["models"].items() for r in rs
                for impl in (("jnp",) if r == 0 else ("jnp", "pallas"))]
    if name == "int8":
        return [dict(mode=mode, impl=mode, setting=f"{settings['model']} inference, batch {settings['batch']}")
                for mode in ("bf16", "int8")]
    raise ValueError(f"Unknown section {name!r}; valid choices: {SECTIONS}")


# ------------------------------------------------------------------------------------------------
# Child: measures cells, one JSON line each
# ------------------------------------------------------------------------------------------------

def free_memory() -> None:
    """Drops compiled executables and dead buffers, so one cell's leftovers cannot run the next out of memory."""
    gc.collect()
    jax.clear_caches()


def environment() -> Dict[str, Any]:
    """Returns the report header: device, versions, date, peak (starts the backend: child only)."""
    import jaxlib

    import bench_attention
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    try:
        info = jax.print_environment_info(return_string=True)
    except Exception as error:  # noqa: BLE001 -- nvidia-smi may be missing
        info = short_error(error)
    return dict(device_kind=kind, platform=jax.default_backend(), device_count=jax.device_count(),
                jax_version=jax.__version__, jaxlib_version=getattr(jaxlib, "__version__", "unknown"),
                python=sys.version.split()[0], bf16_peak_tflops=bench_attention.bf16_peak(kind),
                environment_info=info)


def train_recipe(settings: Dict[str, Any], bench_mae) -> Dict[str, Any]:
    """Returns a train section's recipe: bench_mae.GPU_RECIPE for "gpu", else the dict given."""
    return dict(bench_mae.GPU_RECIPE) if settings["recipe"] == "gpu" else dict(settings["recipe"])


def time_arm(bench_mae, recipe: Dict[str, Any], arm: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Returns `bench_mae.ArmRunner`'s figures for one arm: compile, warm up, then timed repeats of steps."""
    runner = bench_mae.ArmRunner(recipe, arm)
    try:
        runner.run(settings["warmup"], record=False)
        for _ in range(settings["repeats"]):
            runner.run(settings["steps"])
        result = dict(runner.result(), recipe=recipe)
    finally:
        del runner
        free_memory()
    # MAE with mask 0 has no masked patch to reconstruct: its loss is 0/0 by construction; timing is all it is for.
    if arm != "mae_all_tokens" and not math.isfinite(result["final_loss"]):
        raise FloatingPointError(f"the {arm} loss is {result['final_loss']}")
    return result


def measure(name: str, cell: Dict[str, Any], settings: Dict[str, Any], peak, cache: Dict[str, Any]):
    """Returns the raw figures of one cell (raises when the cell fails)."""
    import jax.numpy as jnp
    if name == "attention":
        import bench_attention
        dtype = jnp.dtype(cell.get("dtype", settings["dtype"]))
        head_dim = cell.get("head_dim", settings["head_dim"])
        if cache.get("attention_n") != (cell["n"], head_dim, dtype.name):
            cache.pop("attention_inputs", None)
            free_memory()
            cache["attention_inputs"] = bench_attention.make_inputs(settings["batch"], cell["n"], settings["heads"],
                                                                    head_dim, dtype)
            cache["attention_n"] = (cell["n"], head_dim, dtype.name)
        # A failing impl comes back as a record with a (short) "error" rather than raised.
        return bench_attention.bench_kernel_cell(
            cell["n"], cell["impl"], batch=settings["batch"], heads=settings["heads"], head_dim=head_dim,
            dtype=dtype, warmup=settings["warmup"], iters=settings["iters"], repeats=settings["repeats"], peak=peak,
            inputs=cache["attention_inputs"])
    if name in ("train", "mae"):
        bench_mae = importlib.import_module("bench_mae")  # needs ml_collections (the trainer's config)
        recipe = train_recipe(settings, bench_mae)
        model = model_settings(recipe)
        if name == "train":
            recipe["model"] = dict(recipe["model"], attention_impl=cell["impl"])
            arm, flops = "supervised", 3 * vit_forward_flops(model, recipe["num_classes"])
        else:
            recipe["model"] = dict(recipe["model"], attention_impl="xla")
            arm, flops = cell["arm"], 3 * mae_forward_flops(model, recipe["decoder"], cell["mask_ratio"])
        result = time_arm(bench_mae, recipe, arm, settings)
        result.update(impl=cell["impl"], analytic_flops_per_image=flops, model=model,
                      mfu=result["images_per_sec_per_device"] * flops / (peak * 1e12) if peak else None)
        return result
    if name == "int8":
        import int8_bench
        if "int8" not in cache:
            cache["int8"] = int8_bench.Int8Bench(settings["model"], batch=settings["batch"],
                                                 overrides=settings["overrides"])
        return cache["int8"].run(cell["mode"], settings["iters"], settings["repeats"])
    import bench_tome
    bench = cache.get(("tome", cell["model"]))
    if bench is None:
        cache.clear()
        free_memory()
        bench = cache[("tome", cell["model"])] = bench_tome.ModelBench(
            cell["model"], batch=settings["batch"], dtype=jnp.dtype(settings["dtype"]),
            overrides=settings["overrides"])
    return bench.run(cell["r"], cell["merge_impl"], settings["iters"], settings["repeats"])


def child_main(args) -> None:
    """Measures the cells of one section from `args.start` on, appending one JSON line per cell to args.records."""
    settings = (SMOKE if args.smoke else FULL)[args.child]
    cells = section_cells(args.child, settings)

    def emit(**entry):
        with open(args.records, "a") as f:
            f.write(json.dumps(entry, default=float) + "\n")

    env = environment()
    emit(kind="environment", **env)
    if env["platform"] == "cpu" and not args.smoke:
        emit(kind="fatal", error="No accelerator: the full report would take hours on a CPU. Run it on a GPU, "
                                 "or pass --smoke.")
        return
    cache: Dict[str, Any] = {}
    estimate = args.estimate
    for index in range(args.start, len(cells)):
        cell = cells[index]
        if time.time() + estimate > args.section_end:
            emit(kind="skipped", index=index)
            continue
        print(f"[{args.child} {index + 1}/{len(cells)}] {cell['setting']} {cell['impl']}", flush=True)
        if args.simulate_crash == f"{args.child}:{index}":
            os._exit(7)  # for the test of crash recovery: dies as a segfaulting kernel would
        started = time.time()
        try:
            record = measure(args.child, cell, settings, env["bf16_peak_tflops"], cache)
            failure = record.get("error")
        except Exception as error:  # noqa: BLE001 -- one failing cell must never cost the others
            failure = short_error(error)
        seconds = time.time() - started
        estimate = max(estimate, seconds)  # a cell that failed late took as long as one that ran
        if failure:
            emit(kind="error", index=index, error=failure, seconds=seconds)
            print(f"  failed: {failure}", flush=True)
            try:  # An illegal memory access leaves the device unusable for this process: let a fresh one go on.
                import jax.numpy as jnp
                jax.block_until_ready(jnp.zeros(()) + 1)
            except Exception as device_error:  # noqa: BLE001
                emit(kind="poisoned", index=index, error=short_error(device_error))
                os._exit(3)
            continue
        emit(kind="cell", index=index, record=record, seconds=seconds)


# ------------------------------------------------------------------------------------------------
# Parent: budget, children, the report
# ------------------------------------------------------------------------------------------------

class Report:
    """The rows and raw figures gathered so far; rewrites both after every change (a cut run keeps them)."""

    def __init__(self, args):
        self.args = args
        self.header: Dict[str, Any] = dict(device_kind="unknown (no section has started)", platform="unknown",
                                           device_count=0, bf16_peak_tflops=None, jax_version=jax.__version__,
                                           jaxlib_version="unknown", python=sys.version.split()[0])
        self.header["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.rows: List[Dict[str, str]] = []
        self.raw: Dict[str, List[Dict[str, Any]]] = {name: [] for name in SECTIONS}
        self.notes: List[str] = []
        self.status = "running"

    def add(self, section: str, label: str, cell: Dict[str, Any], *, ms="", throughput="", peak="", note="",
            raw: Optional[Dict[str, Any]] = None) -> None:
        """Adds one table row for `cell` (and its raw figures under `section`); rewrites the outputs."""
        self.rows.append(dict(section=label, setting=cell["setting"], impl=cell["impl"], ms=ms,
                              throughput=throughput, peak=peak, note=note))
        if raw is not None:
            self.raw[section].append(dict(raw, cell={k: v for k, v in cell.items() if k != "setting"}))
        self.write()

    def note(self, text: str) -> None:
        """Adds a line under the table and rewrites the outputs."""
        self.notes.append(text)
        self.write()

    def markdown(self) -> str:
        """Returns the report: a header, ONE table, notes."""
        h = self.header
        peak = f"{h['bf16_peak_tflops']} TFLOP/s" if h["bf16_peak_tflops"] else "unknown for this device"
        lines = [f"# GPU report: {h['device_kind']}", "",
                 f"{h['device_count']} x {h['device_kind']} ({h['platform']}); jax {h['jax_version']}, jaxlib "
                 f"{h['jaxlib_version']}, Python {h['python']}; {h['date']}. Dense bf16 peak: {peak}. Budget "
                 f"{self.args.budget:.0f} s; {time.time() - START:.0f} s so far; {self.status}.", ""]
        if h["platform"] == "cpu":
            lines += ["**CPU smoke run**: tiny sizes, Pallas in interpret mode (the kernels evaluated op by op); "
                      "no number below measures a GPU.", ""]
        lines += ["| section | setting | impl | ms | throughput | % bf16 peak | note |",
                  "|---|---|---|---:|---:|---:|---|"]
        for row in self.rows:
            cells = [str(row[key]).replace("|", "/") for key in ("section", "setting", "impl", "ms", "throughput",
                                                                "peak", "note")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {text}" for text in self.notes]
        return "\n".join(lines) + "\n"

    def write(self) -> str:
        """Writes OUT/gpu_report[_smoke].{md,json}; returns the path stem."""
        results = dict(self.header, settings=self.args.settings, budget_s=self.args.budget,
                       elapsed_s=time.time() - START, status=self.status, complete=self.status == "complete",
                       sections=self.raw, rows=self.rows, notes=self.notes)
        return write_outputs(self.args.out, "gpu_report_smoke" if self.args.smoke else "gpu_report",
                             self.markdown(), results)


def add_rows(report: Report, section: str, cell: Dict[str, Any], entry: Dict[str, Any],
             done: Dict[str, Any]) -> None:
    """Adds the row(s) of one child entry; `done` holds earlier records a row refers to (baselines)."""
    label = LABELS[section]
    if entry["kind"] == "skipped":
        report.add(section, label, cell, note="skipped: the section's time budget is spent",
                   raw=dict(skipped="budget"))
        return
    if entry["kind"] in ("error", "crashed", "stopped"):
        report.add(section, label, cell, note=f"{entry['kind']}: {entry['error']}", raw=dict(error=entry["error"]))
        return
    record = entry["record"]
    if section == "attention":
        other = cell["impl"] != "xla"
        report.add(section, "attention fwd", cell, ms=f"{record['forward_ms']:.3f}",
                   throughput=f"{fmt(record['forward_tflops'])} TFLOP/s",
                   peak=percent(record.get("forward_peak_fraction")),
                   note=f"max rel. error vs xla: out {record['max_rel_error_forward']:.1e}" if other else "",
                   raw=record)
        report.add(section, "attention fwd+bwd", cell, ms=f"{record['forward_backward_ms']:.3f}",
                   throughput=f"{fmt(record['forward_backward_tflops'])} TFLOP/s",
                   peak=percent(record.get("forward_backward_peak_fraction")),
                   note=f"grads {record['max_rel_error_grads']:.1e}" if other else "")
    elif section in ("train", "mae"):
        images_per_second = record["images_per_sec_per_device"]
        xla_count = record["xla_flops_per_step"] / record["batch_size"]
        xla_note = f"; XLA's cost analysis {fmt(xla_count / 1e9)}" if math.isfinite(xla_count) and xla_count else ""
        note = (f"GFLOP/image: analytic {fmt(record['analytic_flops_per_image'] / 1e9)} (3x forward; the MFU's)"
                f"{xla_note}; compile {record['compile_seconds']:.0f} s")
        if section == "mae":
            note = f"encoder patch tokens {record['encoder_patch_tokens']}; " + note
            if "supervised" in done:
                note += f"; {images_per_second / done['supervised']:.2f}x supervised (xla)"
        report.add(section, label, cell, ms=fmt(1e3 * record["seconds_per_step"]),
                   throughput=f"{fmt(images_per_second)} images/s", peak=percent(record["mfu"]), note=note, raw=record)
        if section == "train" and cell["impl"] == "xla":
            done["supervised"] = images_per_second
        if section == "mae":
            done[cell["arm"]] = images_per_second
            if "mae" in done and "mae_all_tokens" in done:
                ratio = done["mae"] / done["mae_all_tokens"]
                report.add(section, "MAE speed-up", dict(setting="mask 0.75 vs mask 0 (images/s ratio)", impl="xla"),
                           throughput=f"{ratio:.2f}x", raw=dict(ratio=ratio),
                           note="paper (He et al. 2021, Table 1c): about 3x; README (CPU, small ViT, fp32): 2.5x; "
                                "analytic FLOP ratio (ViT-B/16, decoder 512 x 8): 2.35x")
    elif section == "int8":
        if cell["mode"] == "bf16":
            done["int8_bf16"] = record["images_per_sec"]
        baseline = done.get("int8_bf16")
        ratio = f"; {record['images_per_sec'] / baseline:.2f}x bf16" if baseline and cell["mode"] == "int8" else ""
        diff = record.get("max_rel_diff_vs_bf16")
        report.add(section, label, cell, ms=fmt(record["ms_per_batch"]),
                   throughput=f"{fmt(record['images_per_sec'])} images/s",
                   note=f"{record['int8_dots']} int8 dots{ratio}"
                        + (f"; logits max rel. diff vs bf16 {diff:.3f}" if diff is not None else ""), raw=record)
    else:
        if cell["r"] == 0:
            done[("tome", cell["model"])] = record["images_per_sec"]
        baseline = done.get(("tome", cell["model"]))
        record["speedup"] = record["images_per_sec"] / baseline if baseline else None
        speedup = f"; {record['speedup']:.2f}x r=0" if record["speedup"] else ""
        report.add(section, label, cell, ms=fmt(record["ms_per_batch"]),
                   throughput=f"{fmt(record['images_per_sec'])} images/s",
                   note=f"{record['final_tokens']} tokens after the last block{speedup}", raw=record)


class HardLimit(Exception):
    """The run reached --hard-limit."""


def run_section(report: Report, args, name: str, section_end: float, hard_end: float, done: Dict[str, Any],
                workdir: str) -> None:
    """Runs a section's cells in child processes, a fresh one after any that dies; adds every cell's rows."""
    cells = section_cells(name, args.settings[name])
    estimate = 0.0 if args.smoke else FIRST_CELL_SECONDS[name]
    start, attempt = 0, 0
    while start < len(cells):
        if time.time() + estimate > section_end:  # not worth starting a process for cells that cannot fit
            for index in range(start, len(cells)):
                add_rows(report, name, cells[index], dict(kind="skipped"), done)
            return
        records = os.path.join(workdir, f"{name}_{attempt}.jsonl")
        attempt += 1
        command = [sys.executable, os.path.abspath(__file__), "--child", name, "--start", str(start),
                   "--section-end", repr(section_end), "--estimate", repr(estimate), "--records", records]
        command += ["--smoke"] if args.smoke else []
        command += ["--simulate-crash", args.simulate_crash] if args.simulate_crash else []
        print(f"[{time.time() - START:6.1f} s] section {name}: cells {start + 1}..{len(cells)} in a new process, "
              f"{max(0.0, section_end - time.time()):.0f} s left for it", flush=True)
        process = subprocess.Popen(command, start_new_session=True)
        read, finished, poisoned = 0, False, False
        while not finished:
            finished = process.poll() is not None
            lines = []
            if os.path.exists(records):
                with open(records) as f:
                    text = f.read()
                # Only whole lines: the child may be halfway through writing the last one.
                lines = text[:text.rfind("\n") + 1].splitlines()
            for line in lines[read:]:
                entry = json.loads(line)
                if entry["kind"] == "environment":
                    report.header.update({k: v for k, v in entry.items() if k != "kind"})
                elif entry["kind"] == "fatal":
                    raise SystemExit(entry["error"])
                elif entry["kind"] != "poisoned":
                    add_rows(report, name, cells[entry["index"]], entry, done)
                    start = entry["index"] + 1
                    estimate = max(estimate, entry.get("seconds", 0.0))
                else:
                    poisoned = True
                    report.note(f"{name}: the GPU was unusable after cell {entry['index'] + 1} ({entry['error']}); "
                                "a fresh process ran the cells after it.")
            read = len(lines)
            if not finished and time.time() > hard_end:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                for index in range(start, len(cells)):
                    reason = f"--hard-limit {args.hard_limit:.0f} s reached " + ("during this cell" if index == start
                                                                               else "before this cell")
                    add_rows(report, name, cells[index], dict(kind="stopped", error=reason), done)
                raise HardLimit
            if not finished:
                time.sleep(0.2)
        if process.returncode != 0 and start < len(cells) and not poisoned:
            # The child died inside cell `start` (no entry for it): report it and go on after it.
            add_rows(report, name, cells[start], dict(kind="crashed", error=f"its process died (exit status "
                                                      f"{process.returncode}); see the log"), done)
            start += 1
        elif process.returncode == 0 or start >= len(cells):
            return


def parent_main(args) -> Dict[str, Any]:
    """Runs every section within the budget; returns the raw figures (also written to --out)."""
    sections = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"Unknown section(s) {unknown}; valid choices: {list(SECTIONS)}")
    args.settings = {name: (SMOKE if args.smoke else FULL)[name] for name in sections}
    if args.smoke and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # The children's CPU compiles take half as long; numerics do not change.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true").strip()
    report = Report(args)
    report.note("FLOPs: attention forward 4BHN^2D, forward+backward 3.5x (FlashAttention-2 convention); train "
                "steps: analytic 3x forward, multiply-add = 2; % bf16 peak is MFU for them. XLA's cost analysis "
                "counts custom calls (cuDNN, Pallas) as 0.")
    end, hard_end = START + args.budget, START + args.hard_limit
    shares = {name: SHARES[name] for name in sections}
    done: Dict[str, Any] = {}
    status = 0
    with tempfile.TemporaryDirectory(prefix="gpu_report_") as workdir:
        try:
            for name in sections:
                share = shares.pop(name)
                seconds = max(0.0, end - time.time()) * share / (share + sum(shares.values()))
                run_section(report, args, name, time.time() + seconds, hard_end, done, workdir)
            report.status = "complete"
        except HardLimit:
            report.status = f"stopped at --hard-limit {args.hard_limit:.0f} s"
            status = 2
            for name in shares:  # the sections never started
                for cell in section_cells(name, args.settings[name]):
                    add_rows(report, name, cell, dict(kind="stopped", error=f"--hard-limit {args.hard_limit:.0f} s "
                                                                            "reached before this cell"), done)
    if report.header["device_kind"] and not report.header.get("bf16_peak_tflops"):
        report.notes.append(f"The dense bf16 peak of {report.header['device_kind']!r} is unknown "
                            "(bench_attention.BF16_PEAK_TFLOPS): no % of peak and no MFU.")
    stem = report.write()
    print(report.markdown())
    print(f"gpu_report: wrote {stem}.md and {stem}.json in {time.time() - START:.0f} s ({report.status})", flush=True)
    if status:
        sys.exit(status)
    return dict(report.header, sections=report.raw, rows=report.rows)


START = time.time()


def main(argv=None):
    """Parses the flags and runs the parent (the report) or a child (one section's cells)."""
    global START
    START = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT_DIR, help="where gpu_report.{md,json} go")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (a CPU: interpret mode)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the sections (default 480; smoke 300, which it never needs)")
    parser.add_argument("--hard-limit", dest="hard_limit", type=float, default=None,
                        help="seconds after the start at which the run ends, whatever runs (default 555, smoke 600)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"a comma list of {SECTIONS}")
    # The parent's instructions to a child process; not for the command line.
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--section-end", dest="section_end", type=float, default=math.inf, help=argparse.SUPPRESS)
    parser.add_argument("--estimate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    parser.add_argument("--simulate-crash", dest="simulate_crash", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budget = args.budget if args.budget is not None else (300.0 if args.smoke else 480.0)
    args.hard_limit = args.hard_limit if args.hard_limit is not None else (600.0 if args.smoke else 555.0)
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    main()
