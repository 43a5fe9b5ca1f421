r"""Ahead-of-time compilation of a run's real train step for a TPU topology, on any host (no TPU attached).

    python -m vitjax.aot --config=configs/mae_b16.py --topology=v5e:4x4
    python -m vitjax.aot --config=configs/mae_b16.py:variant=H/14 --topology=v5p:4x4x8 \
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.batch_size=4096

Needs the `aot` extra (`pip install -e ".[aot]"`: the `libtpu` matching jax, which holds the TPU compiler);
nothing here is imported by `import vitjax`. The step compiled is the trainer's own: `train.build`,
`train.create_train_setup` (mesh, optimizer, abstract state and its shardings) and `train.jit_train_step`
(with the input config's on-device batch transform), over a mesh of the topology's devices, traced with
abstract arrays only. Pallas kernels (`attention_impl="pallas"`) are lowered with Mosaic for the TPU, not
in interpret mode (`vitjax.kernels.common.target_platform`).

Printed per chip: argument / output / temporary memory against the chip's HBM and whether the step fits;
FLOPs and HBM bytes per step (XLA's cost analysis of the per-chip program); bytes of each collective kind
parsed from the compiled HLO (loops counted by their trip counts); a step-time lower bound (the largest
of compute, HBM and ICI time at the chip's peak figures, `CHIPS`) and the MFU ceiling it implies.
"""
import collections
import dataclasses
import math
import os
import re
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# Datasheet figures per chip (bf16 FLOP/s, HBM bytes, HBM bytes/s, ICI bytes/s both directions, all links).
# v5e, v5p: Google Cloud TPU docs (cloud.google.com/tpu/docs/v5e, /v5p); v4: /tpu/docs/v4 (FLOP/s, HBM)
# and the v4 paper (Jouppi et al., ISCA 2023: 6 ICI links x 50 GB/s) for ICI.
@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's peak figures per chip, with where they come from."""
    name: str
    peak_bf16_flops: float
    hbm_bytes: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    source: str


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * 2**30, 1200e9, 300e9,
               "cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GB/s); ICI 6 x 50 GB/s (TPU v4 paper)"),
    "v5e": Chip("v5e", 197e12, 16e9, 819e9, 400e9,
                "cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB, 819 GB/s, ICI 400 GB/s bidirectional)"),
    "v5p": Chip("v5p", 459e12, 95 * 2**30, 2765e9, 1200e9,
                "cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GiB, 2765 GB/s, ICI 1200 GB/s bidirectional)"),
}
# Topology names libtpu knows for each generation: "<gen>:<chips per axis>" (v4, v5p: 3-D; v5e: 2-D).
TOPOLOGY_EXAMPLES = ("v4:2x2x1", "v4:2x2x4", "v5e:2x2", "v5e:4x4", "v5e:16x16", "v5p:2x2x1", "v5p:4x4x4",
                     "v5p:4x4x8", "v5p:4x8x8")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# ImageNet-1k's training split: the schedule's length only, which changes nothing that is compiled.
_NOMINAL_TRAIN_EXAMPLES = 1281167
_NOMINAL_CLASSES = 1000


def chip_of(topology: str) -> Chip:
    """Returns the Chip of a topology name "v5e:4x4" / "v5p:4x4x8" / "v4:2x2x4"; raises naming the valid ones."""
    generation, sep, shape = topology.partition(":")
    if generation not in CHIPS or not sep or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ValueError(f"Unknown TPU topology {topology!r}: give <generation>:<shape> with a generation in "
                         f"{sorted(CHIPS)}, e.g. {', '.join(TOPOLOGY_EXAMPLES)}")
    return CHIPS[generation]


def topology_devices(topology: str) -> List[Any]:
    """Returns the devices of a TPU topology (no TPU needed; libtpu supplies the description)."""
    chip_of(topology)
    # libtpu probes the host for a TPU; these say there is none to find, which silences its warnings.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1" if topology.startswith("v5e") else "")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling needs no TPU to own: let several processes (pytest -n 2, parallel users) load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental import topologies
    try:
        description = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except jax.errors.JaxRuntimeError as error:
        if "INVALID_ARGUMENT" in str(error):
            raise ValueError(f"libtpu does not know the topology {topology!r}: {str(error).splitlines()[0]}; "
                             f"valid examples: {', '.join(TOPOLOGY_EXAMPLES)}") from error
        raise
    except (ImportError, RuntimeError) as error:
        raise RuntimeError(f"Cannot describe TPU topology {topology!r} ({type(error).__name__}: {error}). "
                           "Install the TPU compiler with `pip install -e \".[aot]\"` (libtpu matching jax).") from error
    return list(description.devices)


def devices_per_chip(topology: str, num_devices: int) -> int:
    """Returns how many JAX devices one chip of `topology` shows: 2 for v4 described per TensorCore, else 1."""
    chips = math.prod(int(size) for size in topology.partition(":")[2].split("x"))
    return max(1, num_devices // chips)


# ------------------------------------------------------------------------------------------------
# Collectives in the compiled HLO
# ------------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
# Computations start unindented ("ENTRY %main (...) -> ... {", "%fused_computation.3 (...) -> ... {").
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLED = re.compile(r"\b(?:body|calls|to_apply|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> List[float]:
    """Returns the byte sizes of every array shape written in `text` (e.g. "(f32[8,4], bf16[2])")."""
    sizes = []
    for dtype, dims in _SHAPE.findall(text):
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        sizes.append(count * _DTYPE_BYTES[dtype])
    return sizes


_SCALAR = re.compile(r"\b(?:" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[(\]?)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")


def _parse_computations(hlo_text: str) -> Tuple[Optional[str], Dict[str, List[Tuple[str, str, str, str]]]]:
    """Returns (entry name, {computation: [(instruction name, result shape, opcode, rest of line)]})."""
    computations: Dict[str, List[Tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line[:1].isspace():
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        instruction = _INSTRUCTION.match(line)
        if current is not None and instruction:
            name = line.split("=", 1)[0].strip().removeprefix("ROOT").strip()
            computations[current].append((name,) + instruction.groups())
    return entry, computations


def _scalar_constants(lines) -> Dict[str, int]:
    """Returns {instruction name: value} of a computation's s32[] / u32[] scalar constants."""
    constants = {}
    for name, result, opcode, rest in lines:
        value = re.match(r"(\d+)\)", rest)
        # s32 counters from scan; u32 from the TPU compiler's own loops (the windowed einsums that turn an
        # FSDP all-gather into a ring of collective-permutes inside the matmul).
        if opcode == "constant" and result.startswith(("s32[]", "u32[]")) and value:
            constants[name.lstrip("%")] = int(value.group(1))
    return constants


def _operands(rest: str) -> List[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")")[0])


def _loop_step(body_lines, counter_index: int) -> int:
    """Returns the constant a loop body adds to its counter (tuple element `counter_index`), else 1."""
    if not body_lines or body_lines[-1][2] != "tuple":
        return 1
    elements = _operands(body_lines[-1][3])
    if counter_index >= len(elements):
        return 1
    constants = _scalar_constants(body_lines)
    for name, _, opcode, rest in body_lines:
        if name.lstrip("%") == elements[counter_index] and opcode == "add":
            steps = [constants[operand] for operand in _operands(rest) if operand in constants]
            return steps[0] if steps and steps[0] > 0 else 1
    return 1


def _trip_count(while_rest: str, computations) -> int:
    """Returns a while loop's trip count: XLA's known_trip_count, else `counter < constant` in its condition.

    The second form is what `nn.scan` / `lax.scan` compile to on TPU (a counter from 0, compared LT with
    the length), and also the TPU compiler's windowed-einsum loops (unsigned counters that may step by 2:
    the limit is divided by the constant the body adds to the counter); a loop of any other shape counts once.
    """
    trip = _TRIP_COUNT.search(while_rest)
    if trip:
        return int(trip.group(1))
    condition = re.search(r"\bcondition=%?([\w.\-]+)", while_rest)
    body = re.search(r"\bbody=%?([\w.\-]+)", while_rest)
    lines = computations.get(condition.group(1), []) if condition else []
    constants = _scalar_constants(lines)
    for name, result, opcode, rest in lines:
        if opcode == "compare" and "direction=LT" in rest:
            operands = _operands(rest)
            if len(operands) == 2 and operands[1] in constants:
                counter = next((re.search(r"index=(\d+)", other_rest) for other, _, other_opcode, other_rest in lines
                                if other.lstrip("%") == operands[0] and other_opcode == "get-tuple-element"), None)
                step = (_loop_step(computations.get(body.group(1), []) if body else [], int(counter.group(1)))
                        if counter else 1)
                return -(-constants[operands[1]] // step)
    return 1


def collective_bytes(hlo_text: str) -> Dict[str, float]:
    """Returns {collective kind: bytes per chip per step} from a compiled (per-device) HLO module's text.

    The size counted is the full buffer of the collective: an all-gather's result, a reduce-scatter's
    operand, an all-reduce's operand, an all-to-all's or collective-permute's result. The TPU compiler
    splits one collective over several async fusions that each hold a copy of it with the same channel
    id: each channel counts once. A reduce-scatter appears as an all-reduce inside an
    "all-reduce-scatter" fusion. Collectives inside while loops count their known trip count times.
    """
    entry, computations = _parse_computations(hlo_text)

    def kind_of(opcode: str, computation: str) -> Optional[str]:
        base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if base == "all-reduce" and computation.startswith("all-reduce-scatter"):
            return "reduce-scatter"
        return base if base in COLLECTIVES else None

    memo: Dict[str, Dict[str, Tuple[str, float]]] = {}

    def visit(name: str, depth: int = 0) -> Dict[str, Tuple[str, float]]:
        """Returns {channel: (kind, bytes)} of the collectives `name` runs, loops unrolled."""
        if name in memo or depth > 64:
            return memo.get(name, {})
        found: Dict[str, Tuple[str, float]] = {}
        for instruction, result, opcode, rest in computations.get(name, []):
            kind = kind_of(opcode, name)
            if kind is not None:
                sizes = _shape_bytes(result)
                if opcode.endswith("-start"):
                    # (operands, results, scalar sync words): the results.
                    arrays = [size for size, scalar in zip(sizes, _SCALAR.findall(result)) if not scalar]
                    sizes = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
                channel = _CHANNEL.search(rest)
                key = f"channel {channel.group(1)}" if channel else f"{name}/{instruction}"
                found[key] = (kind, max(found.get(key, (kind, 0.0))[1], float(sum(sizes))))
            repeat = 1
            if opcode == "while":
                repeat = _trip_count(rest, computations)
            for called in _CALLED.findall(rest):
                for callee in re.split(r"[,\s%]+", called):
                    if callee and callee in computations and callee != name:
                        for key, (kind, size) in visit(callee, depth + 1).items():
                            key = f"{instruction}/{key}" if repeat > 1 else key
                            found[key] = (kind, max(found.get(key, (kind, 0.0))[1], repeat * size))
        memo[name] = found
        return found

    totals = collections.defaultdict(float)
    for kind, size in (visit(entry) if entry else {}).values():
        totals[kind] += size
    return {kind: float(totals.get(kind, 0.0)) for kind in COLLECTIVES}


def ici_seconds(collectives: Dict[str, float], group_size: int, chip: Chip) -> float:
    """Returns a lower bound on the seconds the collectives take on the chip's links (ring algorithms).

    A ring all-gather / reduce-scatter of a B-byte buffer over n chips sends B (n - 1) / n bytes from each
    chip, an all-reduce twice that; all links together at the datasheet bandwidth. `group_size` is the
    largest group (the mesh axis the collectives run over); smaller groups only make this looser.
    """
    share = (group_size - 1) / group_size if group_size > 1 else 0.0
    moved = share * (collectives["all-gather"] + collectives["reduce-scatter"] + 2 * collectives["all-reduce"]
                     + collectives["all-to-all"]) + collectives["collective-permute"]
    return moved / chip.ici_bytes_per_s


# ------------------------------------------------------------------------------------------------
# Building and compiling the trainer's step
# ------------------------------------------------------------------------------------------------
def image_shape(config, image_size: Optional[int] = None) -> Tuple[int, int, int]:
    """Returns the (H, W, C) of the run's images: `image_size`, else config.model.img_size, else the model's own."""
    size = image_size or config.model.get("img_size")
    channels = int(config.model.get("in_chans", 3))
    if not size:
        from vitjax import models
        try:
            _, height, width = models.pretrained_cfg(config.model_name)["input_size"]
            return int(height), int(width), channels
        except (KeyError, ValueError):
            size = 224
    return int(size), int(size), channels


@dataclasses.dataclass
class Compiled:
    """A compiled train step and what it was built from."""
    compiled: Any
    setup: Any
    chip: Chip
    topology: str
    mesh_shape: Dict[str, int]
    global_batch: int
    compile_seconds: float
    out_of_memory: Optional[str] = None   # the compiler's message when the step does not fit in HBM
    unrolled_flops: Optional[float] = None  # FLOPs of the whole step with the blocks unrolled (scan models)


def compile_train_step(config, topology: str, *, image_size: Optional[int] = None) -> Compiled:
    """Returns the trainer's train step for `config`, compiled for every chip of a TPU `topology`.

    Raises ValueError (before any tracing) for a bad config, a topology name libtpu lacks or a batch that
    does not split over the mesh.
    """
    import flax.linen as nn
    import jax

    from vitjax import parallel, train
    from vitjax.data import mixup
    from vitjax.kernels import common

    chip = chip_of(topology)
    config, objective = train.build(config)
    devices = topology_devices(topology)
    mesh = parallel.create_mesh(config.mesh, devices=devices)
    train.check_batch_sizes(config, mesh, config.eval_batch_size or config.batch_size)
    height, width, channels = image_shape(config, image_size)
    example_batch = objective.example_batch(np.zeros((1, height, width, channels), np.float32))
    total_steps, steps_per_epoch = train.steps_from_config(config, _NOMINAL_TRAIN_EXAMPLES)
    with common.target_platform("tpu", devices[0].device_kind):
        setup = train.create_train_setup(config, objective, mesh, example_batch, total_steps=total_steps,
                                         steps_per_epoch=steps_per_epoch)
        batch = {key: jax.ShapeDtypeStruct((config.batch_size,) + value.shape[1:], value.dtype,
                                           sharding=setup.batch_sharding) for key, value in example_batch.items()}
        state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                             setup.abstract_state, setup.state_shardings)
        start = time.time()
        with parallel.use_mesh(mesh), nn.logical_axis_rules(setup.rules):
            # As the trainer: the dataset's class count (ImageNet's here) where the objective has none (MAE).
            batch_transform = mixup.make_batch_transform(config.input, objective.num_classes or _NOMINAL_CLASSES)
            step = train.jit_train_step(setup, batch_transform)
            lowered = step.trace(state, batch).lower()
            try:
                compiled, out_of_memory = lowered.compile(), None
            except jax.errors.JaxRuntimeError as error:
                # The TPU compiler refuses a program that cannot fit in HBM: that is an answer, not a failure.
                if "RESOURCE_EXHAUSTED" not in str(error):
                    raise
                compiled, out_of_memory = None, str(error).strip().splitlines()[0]
    compile_seconds = time.time() - start
    # XLA's cost analysis counts a loop body once: with the blocks under nn.scan, the step's FLOPs come
    # from the same step unrolled, lowered (not compiled) for one CPU device, split over the devices.
    unrolled_flops = (_unrolled_step_flops(config, example_batch, total_steps, steps_per_epoch)
                      if config.model.get("scan") else None)
    per_chip = devices_per_chip(topology, len(devices))
    if per_chip > 1:
        # libtpu describes v4 per TensorCore (no megacore): each device holds half a chip's HBM and FLOP/s.
        chip = dataclasses.replace(
            chip, name=f"{chip.name} TensorCore", peak_bf16_flops=chip.peak_bf16_flops / per_chip,
            hbm_bytes=chip.hbm_bytes / per_chip, hbm_bytes_per_s=chip.hbm_bytes_per_s / per_chip,
            ici_bytes_per_s=chip.ici_bytes_per_s / per_chip,
            source=chip.source + f"; the topology shows {per_chip} devices per chip: figures / {per_chip}")
    return Compiled(compiled=compiled, setup=setup, chip=chip, topology=topology, mesh_shape=dict(mesh.shape),
                    global_batch=int(config.batch_size), compile_seconds=compile_seconds,
                    out_of_memory=out_of_memory, unrolled_flops=unrolled_flops)


def _unrolled_step_flops(config, example_batch, total_steps, steps_per_epoch) -> float:
    """Returns the FLOPs of one whole train step (all devices) of `config` with model.scan off, from XLA's
    cost analysis of the step lowered for one CPU device (lowering only: seconds, whatever the depth)."""
    import flax.linen as nn
    import jax

    from vitjax import objectives as objectives_lib
    from vitjax import parallel, train
    from vitjax.data import mixup
    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan = False
    unrolled_objective = objectives_lib.create(unrolled.objective, unrolled)
    mesh = parallel.create_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices("cpu")[:1])
    with common_target(None):
        setup = train.create_train_setup(unrolled, unrolled_objective, mesh, example_batch, total_steps=total_steps,
                                         steps_per_epoch=steps_per_epoch)
        batch = {key: jax.ShapeDtypeStruct((config.batch_size,) + value.shape[1:], value.dtype)
                 for key, value in example_batch.items()}
        with parallel.use_mesh(mesh), nn.logical_axis_rules(setup.rules):
            transform = mixup.make_batch_transform(unrolled.input, unrolled_objective.num_classes or _NOMINAL_CLASSES)
            lowered = train.jit_train_step(setup, transform).trace(setup.abstract_state, batch).lower()
    return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def common_target(platform):
    """Returns kernels.common.target_platform(platform) (imported late: jax loads only when compiling)."""
    from vitjax.kernels import common
    return common.target_platform(platform)


def analyse(result: Compiled) -> Dict[str, Any]:
    """Returns the per-chip figures of a compiled step: memory, fit, FLOPs, collective bytes, time bound, MFU."""
    compiled, chip = result.compiled, result.chip
    common = dict(topology=result.topology, chip=chip.name, devices=int(math.prod(result.mesh_shape.values())),
                  mesh=result.mesh_shape, global_batch=result.global_batch, hbm_bytes=chip.hbm_bytes,
                  compile_seconds=result.compile_seconds, chip_source=chip.source)
    if compiled is None:
        needed = re.search(r"required for [\w ]+\(([\d.]+)([KMGT])\)", result.out_of_memory or "")
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        return dict(common, fits=False, out_of_memory=result.out_of_memory,
                    total_bytes=float(needed.group(1)) * scale[needed.group(2)] if needed else None)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    argument = float(memory.argument_size_in_bytes)
    output = float(memory.output_size_in_bytes)
    alias = float(memory.alias_size_in_bytes)
    temp = float(memory.temp_size_in_bytes)
    code = float(memory.generated_code_size_in_bytes)
    # Donated state aliases its output: count those bytes once.
    total = argument + output - alias + temp + code
    flops = float(cost.get("flops", 0.0))
    hbm_bytes = float(cost.get("bytes accessed", 0.0))
    flops_source = "XLA cost analysis of the compiled per-device program"
    if result.unrolled_flops:
        devices = math.prod(result.mesh_shape.values())
        flops = result.unrolled_flops / devices
        # The compiled traffic counts each loop body once: less than the true traffic, so the time it gives
        # is still a lower bound (a looser one).
        flops_source = ("FLOPs: the unrolled step's / devices; HBM traffic: the scanned program's, loop bodies "
                        "counted once (a lower bound)")
    collectives = collective_bytes(compiled.as_text())
    largest_group = max(size for name, size in result.mesh_shape.items()) if result.mesh_shape else 1
    compute_s = flops / chip.peak_bf16_flops
    hbm_s = hbm_bytes / chip.hbm_bytes_per_s
    ici_s = ici_seconds(collectives, largest_group, chip)
    bound = max(compute_s, hbm_s, ici_s)
    return dict(
        common, argument_bytes=argument, output_bytes=output, alias_bytes=alias, temp_bytes=temp, code_bytes=code,
        total_bytes=total, fits=total <= chip.hbm_bytes,
        flops=flops, hbm_bytes_accessed=hbm_bytes, collectives=collectives,
        compute_seconds=compute_s, hbm_seconds=hbm_s, ici_seconds=ici_s, step_seconds_lower_bound=bound,
        bound_by=max((("compute", compute_s), ("HBM", hbm_s), ("ICI", ici_s)), key=lambda item: item[1])[0],
        mfu_ceiling=compute_s / bound if bound > 0 else 0.0, flops_source=flops_source)


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def format_report(report: Dict[str, Any]) -> str:
    """Returns the per-chip report as printed by the command line."""
    if "out_of_memory" in report:
        return (f"topology {report['topology']} ({report['devices']} devices), mesh {report['mesh']}, global batch "
                f"{report['global_batch']}\nper device ({report['chip']}): DOES NOT FIT in {_gb(report['hbm_bytes'])} HBM; the TPU "
                f"compiler says: {report['out_of_memory']}\n  chip figures: {report['chip_source']}")
    collectives = report["collectives"]
    lines = [
        f"topology {report['topology']} ({report['devices']} devices), mesh {report['mesh']}, global batch "
        f"{report['global_batch']}; compiled in {report['compile_seconds']:.1f} s",
        f"per device ({report['chip']}):",
        f"  memory     arguments {_gb(report['argument_bytes'])}, outputs {_gb(report['output_bytes'])} "
        f"(aliased {_gb(report['alias_bytes'])}), temporaries {_gb(report['temp_bytes'])}, code "
        f"{_gb(report['code_bytes'])}",
        f"             total {_gb(report['total_bytes'])} of {_gb(report['hbm_bytes'])} HBM: "
        + ("fits" if report["fits"] else "DOES NOT FIT"),
        f"  compute    {report['flops'] / 1e12:.3f} TFLOP per step; HBM traffic {_gb(report['hbm_bytes_accessed'])} "
        f"({report['flops_source']})",
        "  collectives " + ", ".join(f"{kind} {_gb(collectives[kind])}" for kind in COLLECTIVES),
        f"  time bound compute {1e3 * report['compute_seconds']:.2f} ms, HBM {1e3 * report['hbm_seconds']:.2f} ms, "
        f"ICI {1e3 * report['ici_seconds']:.2f} ms -> step >= {1e3 * report['step_seconds_lower_bound']:.2f} ms "
        f"({report['bound_by']}-bound), MFU ceiling {100 * report['mfu_ceiling']:.1f}%",
        f"  chip figures: {report['chip_source']}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# One function on one chip (the kernels' compile table)
# ------------------------------------------------------------------------------------------------
def compile_on_chip(function, abstract_args, topology: str,
                    vmem_limit_bytes: Optional[int] = None) -> Dict[str, Any]:
    """Returns {"ok", "seconds", "temp_bytes", "error"} of jit(function) compiled for one chip of `topology`.

    `abstract_args` are ShapeDtypeStructs; Pallas kernels inside lower with Mosaic (not interpret mode).
    A compiler error is returned (its first line), not raised: the kernels' table records what fails.
    vmem_limit_bytes overrides the Mosaic kernels' scoped VMEM limit (`common.target_platform`).
    """
    import jax
    from jax.sharding import SingleDeviceSharding

    from vitjax.kernels import common
    device = topology_devices(topology)[0]
    placed = [jax.ShapeDtypeStruct(arg.shape, arg.dtype, sharding=SingleDeviceSharding(device))
              for arg in abstract_args]
    start = time.time()
    with common.target_platform("tpu", device.device_kind, vmem_limit_bytes):
        try:
            # A fresh wrapper each time: jax caches traces by function, and the kernels' VMEM limit comes
            # from the `target_platform` context, which that cache does not see.
            compiled = jax.jit(lambda *args: function(*args)).trace(*placed).lower().compile()
        except Exception as error:  # noqa: BLE001 - any compiler refusal is a row of the table
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            detail = next((line for line in lines if "VMEM" in line or "vmem" in line), "")
            message = f"{type(error).__name__}: {lines[0] if lines else ''}"
            if detail and detail not in message:
                message += f" ({detail})"
            return dict(ok=False, seconds=time.time() - start, error=message[:400])
    memory = compiled.memory_analysis()
    return dict(ok=True, seconds=time.time() - start, temp_bytes=float(memory.temp_size_in_bytes), error=None)


def mosaic_vmem_needed(function, abstract_args, topology: str, *, granule: int = 16 * 2**10,
                       high: int = 128 * 2**20) -> Optional[int]:
    """Returns the smallest scoped VMEM limit (a multiple of `granule`) with which `function` compiles for `topology`.

    That is the VMEM its largest Mosaic kernel needs, as the TPU compiler decides it (pipeline buffers,
    scratch and the kernel body's temporaries); found by bisection, about log2(high / granule) compiles.
    None when it does not compile even at `high` (or fails for another reason).
    """
    if not compile_on_chip(function, abstract_args, topology, vmem_limit_bytes=high)["ok"]:
        return None
    low, high = 0, high // granule   # compiles at high * granule, assumed not at 0
    while high - low > 1:
        middle = (low + high) // 2
        if compile_on_chip(function, abstract_args, topology, vmem_limit_bytes=middle * granule)["ok"]:
            high = middle
        else:
            low = middle
    return high * granule


# ------------------------------------------------------------------------------------------------
# One function's Pallas Triton kernels, compiled for an NVIDIA GPU on this host (no GPU needed)
# ------------------------------------------------------------------------------------------------
# Largest shared memory one thread block may use (opt-in dynamic shared memory), by compute capability:
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (8.0: 163 KB, 9.0: 227 KB).
GPU_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
GPU_MAX_REGISTERS = 255  # per thread, every capability since 3.5 (same table)


def triton_kernels(function, abstract_args) -> List[Dict[str, Any]]:
    """Returns the Triton kernels of jit(function) lowered for CUDA: name, TTIR bytecode, grid and launch sizes.

    The Pallas kernels inside lower with Triton (`target_platform("gpu")`); jax's CPU-only jaxlib lowers
    them (it only cannot compile them), so this runs on any host.
    """
    import jax
    from jax._src.lib.mlir import ir

    from vitjax.kernels import common
    with common.target_platform("gpu"):
        module = jax.jit(function).trace(*abstract_args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    kernels = []

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if op.operation.name == "stablehlo.custom_call" and "xla.gpu.triton" in str(
                            op.attributes["call_target_name"]):
                        config = op.attributes["mhlo.backend_config"]
                        kernels.append(dict(
                            name=ir.StringAttr(config["name"]).value,
                            ir=ir.StringAttr(config["ir"]).value_bytes,
                            grid=tuple(ir.IntegerAttr(config[f"grid_{axis}"]).value for axis in "xyz"),
                            num_warps=ir.IntegerAttr(config["num_warps"]).value,
                            num_stages=ir.IntegerAttr(config["num_stages"]).value))
                    walk(op.operation)
    walk(module.operation)
    return kernels


def _ptxas_usage(ptxas: str, ptx: str, arch: str) -> Dict[str, int]:
    """Returns {"registers", "spill_bytes"} that ptxas reports for one kernel's PTX (spill stores plus loads)."""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        done = subprocess.run([ptxas, "-v", f"-arch={arch}", source, "-o", os.path.join(folder, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    report = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    return dict(registers=int(registers.group(1)) if registers else -1, spill_bytes=sum(spills))


def compile_for_gpu(function, abstract_args, capability: int = 90) -> Dict[str, Any]:
    """Returns {"ok", "seconds", "kernels", "error"}: jit(function)'s Triton kernels compiled to a cubin for one GPU.

    Each kernel's TTIR (as jax emits it) goes through the `triton` package's compiler (TTIR -> TTGIR ->
    LLVM -> PTX -> ptxas; `capability` 90 is sm_90a, Hopper). Per kernel: shared memory, registers, spilled
    bytes and whether it fits the limits of `GPU_SHARED_BYTES` / `GPU_MAX_REGISTERS`. XLA compiles these
    kernels with the Triton inside jaxlib, not this package, so the figures are this compiler's: close,
    not identical. Needs the `triton` package (installed with torch on Linux).
    """
    import triton
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend, get_ptxas

    start = time.time()
    try:
        kernels = triton_kernels(function, abstract_args)
    except Exception as error:  # noqa: BLE001 - a lowering refusal is a row of the table
        return dict(ok=False, seconds=time.time() - start, kernels=[], error=f"{type(error).__name__}: {error}"[:400])
    target = GPUTarget("cuda", capability, 32)
    backend = CUDABackend(target)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    results = []
    for kernel in kernels:
        context = triton_ir.context()
        triton_ir.load_dialects(context)
        backend.load_dialects(context)
        with tempfile.TemporaryDirectory() as folder:
            bytecode, text = os.path.join(folder, "kernel.mlirbc"), os.path.join(folder, "kernel.ttir")
            with open(bytecode, "wb") as file:
                file.write(kernel["ir"])
            with open(text, "w") as file:
                file.write(str(triton_ir.parse_mlir_module(bytecode, context)))
            entry = dict(name=kernel["name"], grid=kernel["grid"], num_warps=kernel["num_warps"],
                         num_stages=kernel["num_stages"])
            try:
                compiled = triton.compile(text, target=target, options=dict(num_warps=kernel["num_warps"],
                                                                             num_stages=kernel["num_stages"]))
            except Exception as error:  # noqa: BLE001
                lines = [line for line in str(error).splitlines() if line.strip()]
                results.append(dict(entry, ok=False, error=f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]))
                continue
        usage = _ptxas_usage(get_ptxas(capability).path, compiled.asm["ptx"], arch)
        shared = int(compiled.metadata.shared)
        problems = []
        if shared > GPU_SHARED_BYTES[capability]:
            problems.append(f"shared memory {shared / 1024:.0f} KB > {GPU_SHARED_BYTES[capability] // 1024} KB")
        if usage["spill_bytes"]:
            problems.append(f"{usage['spill_bytes']} bytes of register spills")
        results.append(dict(entry, ok=shared <= GPU_SHARED_BYTES[capability], shared_bytes=shared, **usage,
                            error="; ".join(problems) or None))
    ok = bool(results) and all(result["ok"] for result in results)
    errors = [f"{result['name']}: {result['error']}" for result in results if result.get("error")]
    return dict(ok=ok, seconds=time.time() - start, kernels=results, error="; ".join(errors) or None)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def define_flags(flag_values) -> None:
    """Defines --config (with --config.KEY=VALUE overrides), --topology, --image_size and --json."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file, optionally with arguments: configs/FILE.py:ARGS",
                                    flag_values=flag_values, lock_config=False)
    flags.DEFINE_string("topology", "v5e:2x2", f"TPU topology, e.g. {', '.join(TOPOLOGY_EXAMPLES)}",
                        flag_values=flag_values)
    flags.DEFINE_integer("image_size", None, "Image side (default config.model.img_size or the model's own)",
                         flag_values=flag_values)
    flags.DEFINE_string("json", None, "Also write the report as JSON to this path", flag_values=flag_values)
    flags.DEFINE_multi_string("set", [], "KEY=VALUE config settings that may add keys to open sections "
                              "(e.g. --set=model.scan=True), applied after --config.KEY overrides",
                              flag_values=flag_values)


def run(flag_values) -> Dict[str, Any]:
    """Returns the report of compiling --config's train step for --topology, after printing it."""
    import json

    from vitjax import cli
    if flag_values["config"].value is None:
        raise SystemExit("FATAL: --config is required, e.g. --config=configs/mae_b16.py")

    def work():
        from vitjax import config_utils
        config = flag_values["config"].value
        for setting in flag_values["set"].value:
            config_utils.set_key(config, *cli.parse_setting(setting))
        return analyse(compile_train_step(config, flag_values["topology"].value,
                                          image_size=flag_values["image_size"].value))

    report = cli.exit_on_user_error(work)
    print(format_report(report), flush=True)
    if flag_values["json"].value:
        with open(flag_values["json"].value, "w") as file:
            json.dump(report, file, indent=1, default=float)
    return report


if __name__ == "__main__":
    from vitjax import cli as _cli
    _cli.main(define_flags, run)
