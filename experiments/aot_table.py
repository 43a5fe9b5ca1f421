r"""The pod-scale table: real train steps compiled ahead of time for TPU pods (`python -m vitjax.aot`), no TPU needed.

    python experiments/aot_table.py --out experiments/out            # every row, one subprocess each
    python experiments/aot_table.py --rows deit_b16_v4_32 --out /tmp   # one row

Each row is one `python -m vitjax.aot` run of a config from configs/ at its paper batch size; the table
gives per chip the memory against HBM (fits or not), the collective bytes parsed from the compiled HLO,
the step-time lower bound and the MFU ceiling from the chip's datasheet figures (`vitjax.aot.CHIPS`).
Rows marked `scan` compile the encoder blocks as one `nn.scan` loop (`--set=model.scan=True`): the same
math and memory plan with a compile time that does not grow with depth; remat is off everywhere.
Writes experiments/out/aot_table.{md,json}.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.model=1"]
FSDP_TP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.model=4"]
SCAN = ["--set=model.scan=True"]

# (name, description, config, topology, extra flags)
ROWS = [
    ("mae_b16_v5e_16", "MAE B/16 headline (batch 4096)", "configs/mae_b16.py", "v5e:4x4", FSDP + SCAN),
    ("mae_b16_v5e_16_remat", "MAE B/16 headline (batch 4096), remat", "configs/mae_b16.py", "v5e:4x4",
     FSDP + SCAN + ["--set=model.remat=True"]),
    ("deit_b16_v4_32", "DeiT B/16 (batch 1024)", "configs/vit_i1k.py:variant=B/16", "v4:2x2x4",
     FSDP + SCAN + ["--config.eval_batch_size=1024"]),
    ("mae_l16_v5p_128_fsdp", "MAE L/16 (batch 4096), FSDP", "configs/mae_b16.py:variant=L/16", "v5p:4x4x4",
     FSDP + SCAN),
    ("mae_l16_v5p_128_fsdp_tp", "MAE L/16 (batch 4096), FSDP x TP 4", "configs/mae_b16.py:variant=L/16",
     "v5p:4x4x4", FSDP_TP + SCAN),
    ("mae_h14_v5p_128_fsdp", "MAE H/14 (batch 4096), FSDP", "configs/mae_b16.py:variant=H/14", "v5p:4x4x4",
     FSDP + SCAN),
    ("mae_h14_v5p_128_fsdp_tp", "MAE H/14 (batch 4096), FSDP x TP 4", "configs/mae_b16.py:variant=H/14",
     "v5p:4x4x4", FSDP_TP + SCAN),
    ("vit_g14_v5p_256", "ViT-g/14 DeiT recipe (batch 4096), FSDP", "configs/vit_i1k.py:variant=B/16", "v5p:4x4x8",
     FSDP + SCAN + ["--set=model.variant=g/14", "--config.batch_size=4096",
                                               "--config.eval_batch_size=4096"]),
    # Largest ViT at the same batch on each topology: the next size up from the rows above.
    ("deit_l16_v4_32", "larger? DeiT L/16 (batch 1024)", "configs/vit_i1k.py:variant=B/16", "v4:2x2x4",
     FSDP + SCAN + ["--set=model.variant=L/16", "--config.eval_batch_size=1024"]),
    ("mae_l16_v5e_16", "larger? MAE L/16 (batch 4096)", "configs/mae_b16.py:variant=L/16", "v5e:4x4",
     FSDP + SCAN),
    ("mae_g14_v5p_128", "larger? MAE g/14 (batch 4096), FSDP", "configs/mae_b16.py:variant=H/14",
     "v5p:4x4x4", FSDP + SCAN + ["--set=model.variant=g/14"]),
]


def run_row(name, config, topology, flags, timeout):
    """Returns the report of one `python -m vitjax.aot` run (or {"error": ...})."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        command = [sys.executable, "-m", "vitjax.aot", f"--config={config}", f"--topology={topology}",
                   f"--json={path}"] + flags
        start = time.time()
        try:
            process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                     env={**os.environ, "PYTHONPATH": REPO})
        except subprocess.TimeoutExpired:
            return {"error": f"compile took over {timeout} s"}
        if process.returncode or not os.path.exists(path):
            lines = [line for line in (process.stderr + process.stdout).splitlines()
                     if line.strip() and not line.startswith(("W0000", "E0000", "I0000"))]
            return {"error": " ".join(lines[-2:])[:300], "seconds": time.time() - start}
        with open(path) as file:
            report = json.load(file)
        report["wall_seconds"] = time.time() - start
        report["command"] = "python -m vitjax.aot " + " ".join(command[3:5] + command[6:])
        return report


def markdown(results):
    """Returns the markdown table of the rows' reports."""
    lines = ["| run | topology (devices) | mesh d/f/m | memory per device (GB) | HBM per device (GB) | fits | all-gather / "
             "reduce-scatter / all-reduce / permute (GB per device) | TFLOP per device | step >= (ms) | bound | "
             "MFU ceiling |",
             "|---|---|---|---:|---:|---|---|---:|---:|---|---:|"]
    for name, description, _, topology, _ in ROWS:
        report = results.get(name)
        if report is None:
            continue
        if "out_of_memory" in report:
            mesh = report["mesh"]
            needed = f"{report['total_bytes'] / 1e9:.1f} (temporaries)" if report.get("total_bytes") else "?"
            lines.append(f"| {description} | {topology} ({report.get('devices', report.get('chips'))}) | {mesh['data']}/{mesh['fsdp']}/"
                         f"{mesh['model']} | {needed} | {report['hbm_bytes'] / 1e9:.1f} | **no** (compiler: out of "
                         f"HBM) | | | | | |")
            continue
        if "error" in report:
            lines.append(f"| {description} | {topology} | | | | not compiled: {report['error']} | | | | | |")
            continue
        mesh = report["mesh"]
        c = report["collectives"]
        lines.append(
            f"| {description} | {topology} ({report.get('devices', report.get('chips'))}) | {mesh['data']}/{mesh['fsdp']}/{mesh['model']} | "
            f"{report['total_bytes'] / 1e9:.1f} | {report['hbm_bytes'] / 1e9:.1f} | "
            f"{'yes' if report['fits'] else '**no**'} | {c['all-gather'] / 1e9:.2f} / {c['reduce-scatter'] / 1e9:.2f}"
            f" / {c['all-reduce'] / 1e9:.2f} / {c['collective-permute'] / 1e9:.2f} | {report['flops'] / 1e12:.1f} | "
            f"{1e3 * report['step_seconds_lower_bound']:.0f} | {report['bound_by']} | "
            f"{100 * report['mfu_ceiling']:.0f}% |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "experiments", "out"))
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
    args = parser.parse_args()
    wanted = [name for name in args.rows.split(",") if name] or [row[0] for row in ROWS]
    unknown = sorted(set(wanted) - {row[0] for row in ROWS})
    if unknown:
        raise SystemExit(f"Unknown rows {unknown}; valid: {[row[0] for row in ROWS]}")
    json_path = os.path.join(args.out, "aot_table.json")
    results = {}
    if os.path.exists(json_path):  # rows not rerun keep their last figures
        with open(json_path) as file:
            results = json.load(file)
    for name, description, config, topology, flags in ROWS:
        if name not in wanted:
            continue
        print(f"{name}: {config} on {topology} ...", flush=True)
        results[name] = run_row(name, config, topology, flags, args.timeout)
        print("  ", {key: results[name].get(key) for key in ("total_bytes", "fits", "mfu_ceiling", "error",
                                                            "compile_seconds")}, flush=True)
        write_outputs(args.out, "aot_table", markdown(results), results)
    table = markdown(results)
    print(table)
    write_outputs(args.out, "aot_table", table, results)


if __name__ == "__main__":
    main()
