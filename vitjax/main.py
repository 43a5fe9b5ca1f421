"""Entry point: train and evaluate one config.

    python -m vitjax.main --config=configs/digits_vit.py --workdir=/tmp/digits
    python -m vitjax.main --config=configs/vit_i1k.py:variant=B/16 --workdir=gs://bucket/vit_b16 \
        --config.batch_size=2048 --config.optim.blr=5e-4

`--config=FILE.py[:ARGS]` calls the file's `get_config(ARGS)`; `--config.KEY=VALUE` overrides a key
(typed; a key the config does not have is refused). Config errors stop the run before anything
is built or compiled. A run on a WORKDIR holding checkpoints resumes from the newest complete one.
Multi-host runs (TPU pods, SLURM, ...) call `jax.distributed.initialize()`: automatically when the
launcher's environment is detected, or with --multihost=on.

Every restored checkpoint is verified against the fingerprints saved with it; a damaged step is moved
aside and the previous one restored (`vitjax.checkpoint`). SIGTERM or SIGINT during training saves
the current step and exits with status 75 (EXIT_PREEMPTED); rerun the same command to resume.

Exit status: 0 done; 1 FATAL: a config, data, checkpoint or NaN error, said in one line; 75 preempted
(the step is saved).
"""
import logging as logging_std
import re
import sys
from typing import List, Optional

from absl import app, flags, logging
from ml_collections import config_flags

# EX_TEMPFAIL of sysexits.h, "try again later": a scheduler that requeues on it resumes the run exactly.
EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with arguments: configs/FILE.py:key=value,flag", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard logs.")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                               "Call jax.distributed.initialize(): auto = when a multi-host launch is detected.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though its saved config differs from this one in more "
    "than run length and cadences (the differences are logged).")
flags.mark_flags_as_required(["config", "workdir"])


def _config_spec(argv: List[str]) -> Optional[str]:
    """Returns the --config value named in argv ("path.py[:args]"), or None."""
    for index, item in enumerate(argv):
        if item.startswith("--config="):
            return item.split("=", 1)[1]
        if item == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def explain_override_error(argv: List[str]) -> Optional[str]:
    """Returns a message naming the first `--config.KEY=...` override whose key the config lacks; valid keys."""
    from vitjax import config_utils
    spec = _config_spec(argv)
    if not spec:
        return None
    try:
        config = config_utils.load_config(spec)
    except Exception:  # noqa: BLE001 - the config file's own error is reported by config_flags
        return None
    for item in argv:
        match = re.match(r"--config\.([\w.]+)(=|$)", item)
        if not match:
            continue
        node, walked = config, []
        for key in match.group(1).split("."):
            keys = sorted(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                where = f"config.{'.'.join(walked)}" if walked else "config"
                return (f"Unknown config key in override {item!r}: {where} has no key {key!r}; "
                        f"valid keys: {keys}")
            node, walked = node[key], walked + [key]
    return None


def parse_flags(argv: List[str]) -> List[str]:
    """Returns the remaining argv after absl parsing; config overrides of unknown keys exit with a clear message."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "Traceback" in message:  # config_flags wraps the config file's error in its traceback
            lines = [line for line in message.splitlines() if line.strip()]
            message = f"{lines[0]} {lines[-1]}"
        sys.exit(f"FATAL flags error: {message}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as error:
        message = explain_override_error(argv) or f"Bad config override: {error}"
        sys.exit(f"FATAL config error: {message}")


class _QuietLibraries(logging_std.Filter):
    """Drops INFO records of chatty libraries (orbax, TFDS); their warnings and errors pass."""

    _PACKAGES = ("orbax", "tensorflow_datasets", "etils")

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or not any(
            f"/{package}/" in record.pathname for package in self._PACKAGES)


def main(argv: List[str]) -> None:
    """Trains and evaluates the --config in --workdir and prints the final eval metrics."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from vitjax import parallel, train  # after flag parsing, so --help stays fast

    parallel.maybe_initialize_distributed({"auto": None, "on": True, "off": False}[_MULTIHOST.value])
    config = _CONFIG.value
    try:
        train.build(config)  # every config error, before anything is compiled
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"FATAL config error: {error}")
    from vitjax import checkpoint
    from vitjax.data import DatasetNotPreparedError
    try:
        final = train.train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except DatasetNotPreparedError as error:
        spec = (_config_spec(sys.argv) or "configs/FILE.py").split(":")[0]
        sys.exit(f"FATAL: {error}\nTo try the recipe on the bundled digits on a CPU instead: "
                 f"--config={spec}:runlocal")
    except train.ConfigChangedError as error:
        sys.exit(f"FATAL: {error}")
    except FloatingPointError as error:
        logging.error("%s", error)
        sys.exit(f"FATAL: {error}")
    except (checkpoint.NoGoodCheckpointError, checkpoint.CheckpointMismatchError, checkpoint.CheckpointSaveError,
            checkpoint.CheckpointDamagedError) as error:
        sys.exit(f"FATAL: {error}")
    except train.Preempted as error:
        print(f"PREEMPTED: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    print(final_summary(final, config), flush=True)


def final_summary(final, config) -> str:
    """Returns the closing line: top-1 (top-5, loss) of each classification evaluator, else every eval metric."""
    from vitjax.evaluate import evaluators
    lines = []
    for name, settings in evaluators.default_evals(config).items():
        if f"{name}/top1" not in final:
            continue
        split = (settings.get("split") or config.get("input", {}).get("eval_split") or name)
        label = split if name == "eval" else f"{name} ({split})"
        extras = [f"top-5 {100 * final[f'{name}/top5']:.2f}%" if f"{name}/top5" in final else None,
                  f"loss {final[f'{name}/loss']:.4f}" if f"{name}/loss" in final else None,
                  f"{final.get(f'{name}/num_examples')} examples", f"step {final.get('step')}"]
        lines.append(f"Final {label} top-1: {100 * final[f'{name}/top1']:.2f}%  "
                     f"({', '.join(extra for extra in extras if extra)})")
    if lines:
        return "\n".join(lines)
    metrics = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in sorted(final.items()))
    return f"Final metrics: {metrics}"


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
