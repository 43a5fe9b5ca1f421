r"""Command line: evaluate weights on a classification split, without training.

    # a vitjax workdir (e.g. the quickstart's): its config.json says the model, data and preprocessing
    python -m vitjax.evaluate --init_from=/tmp/vitjax_digits
    # converted timm weights (`python -m vitjax.convert`): the model and preprocessing travel in the file
    python -m vitjax.evaluate --init_from=vit_b16.msgpack --dataset=imagenet2012 --split=validation
    # a timm checkpoint, converted on the fly, at another resolution
    python -m vitjax.evaluate --model=deit_small_patch16_224 --init_from=deit_s.pth \
        --dataset=imagenet2012 --image_size=256

Flags: --init_from (any `vitjax.weights` source: a workdir, PATH@STEP, a .msgpack / orbax directory, a
timm .pth / .safetensors, an official MAE .pth), --model (needed where the source does not name its
model), --set KEY=VALUE (repeatable model options, e.g. --set=depth=2), --dataset (TFDS name or
"digits"), --split (default: the run's eval split, else "validation" where the dataset has one, else
"test"), --data_dir, --pp (default: the run's pp_eval, else `vitjax.data.pretrained_pp` of the weights'
pretrained cfg), --image_size, --batch_size, --num_examples (the first N of the split),
--save_logits=PATH.npy ((N, classes) float32, in the split's order).

Prints how the weights were fitted (loaded / resampled per parameter group), then top-1, top-5, loss
and the number of examples. Bad input stops with a message naming the valid choices.

Other evaluator kinds (`vitjax.evaluate.evaluators.list_kinds()`: knn, linear_probe, fewshot, ...) read a
run's objective features, so they take a vitjax workdir: --kind=KIND with --eval_set KEY=VALUE settings
of that kind (as in config.evals), e.g.
    python -m vitjax.evaluate --init_from=/tmp/gmml_local --kind=fewshot --eval_set=shots=(1,10)
"""
from typing import List

from absl import flags

from vitjax import cli as cli_lib


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines this command's flags in `flag_values` (the global FLAGS when run as a program)."""
    flags.DEFINE_string("init_from", None, "The weights: a vitjax workdir (PATH@STEP for a step), a .msgpack or orbax "
                        "directory from vitjax.convert, a timm / PyTorch checkpoint or an official MAE .pth.",
                        flag_values=flag_values)
    flags.DEFINE_string("model", None, "A registered model name (default: the one the source names).",
                        flag_values=flag_values)
    flags.DEFINE_multi_string("set", [], "KEY=VALUE: a model option on top of the source's (a Python literal where "
                              "it parses as one), e.g. --set=depth=2.", flag_values=flag_values)
    flags.DEFINE_string("dataset", None, "TFDS dataset name, or digits (default: the run's).", flag_values=flag_values)
    flags.DEFINE_string("split", None, "Split to evaluate (default: the run's eval split, else validation or test).",
                        flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's, else $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets).", flag_values=flag_values)
    flags.DEFINE_string("pp", None, "Eval preprocessing as a pp string (default: the run's pp_eval, else the "
                        "weights' pretrained cfg).", flag_values=flag_values)
    flags.DEFINE_integer("image_size", None, "Input resolution (sets the model's img_size and the preprocessing).",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 256, "Eval batch size.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("num_examples", None, "Evaluate only the first N examples of the split.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_string("save_logits", None, "Write the logits of the evaluated examples to this .npy file.",
                        flag_values=flag_values)
    flags.DEFINE_string("kind", "classification", "Evaluator kind (vitjax.evaluate.evaluators.list_kinds()); other "
                        "than classification it needs a vitjax workdir as --init_from.", flag_values=flag_values)
    flags.DEFINE_multi_string("eval_set", [], "KEY=VALUE: a setting of the --kind evaluator (as in config.evals).",
                              flag_values=flag_values)
    flags.mark_flag_as_required("init_from", flag_values=flag_values)


def run(flag_values: flags.FlagValues) -> None:
    """Evaluates as the parsed `flag_values` say and prints the result; exits with a one-line message on bad input."""
    from vitjax.data import DatasetNotPreparedError
    from vitjax.evaluate import pretrained
    if flag_values.kind != "classification":
        run_kind(flag_values)
        return
    overrides = cli_lib.exit_on_user_error(lambda: dict(cli_lib.parse_setting(item) for item in flag_values.set))
    result = cli_lib.exit_on_user_error(lambda: pretrained.evaluate_pretrained(
        flag_values.init_from, model_name=flag_values.model, model_overrides=overrides,
        dataset=flag_values.dataset, split=flag_values.split, data_dir=flag_values.data_dir, pp=flag_values.pp,
        image_size=flag_values.image_size, batch_size=flag_values.batch_size,
        num_examples=flag_values.num_examples, return_logits=bool(flag_values.save_logits)),
        cli_lib.USER_ERRORS + (DatasetNotPreparedError,))
    if flag_values.save_logits:
        import numpy as np
        np.save(flag_values.save_logits, result.logits)
        print(f"wrote logits {result.logits.shape} to {flag_values.save_logits}")
    print(pretrained.summary(result), flush=True)


def run_kind(flag_values: flags.FlagValues) -> None:
    """Runs the evaluator --kind on the run --init_from and prints its metrics."""
    from vitjax.data import DatasetNotPreparedError
    from vitjax.evaluate import evaluators, standalone

    def evaluate():
        if flag_values.kind not in evaluators.list_kinds():
            raise ValueError(f"--kind={flag_values.kind!r} is not valid; valid kinds: {evaluators.list_kinds()}")
        settings = dict(cli_lib.parse_setting(item) for item in flag_values.eval_set)
        if flag_values.split:
            settings["split"] = flag_values.split
        if flag_values.pp:
            settings["pp"] = flag_values.pp
        return standalone.evaluate_run(flag_values.init_from, {flag_values.kind: dict(kind=flag_values.kind,
                                                                                      batch_size=flag_values.batch_size,
                                                                                      **settings)},
                                       dataset=flag_values.dataset, data_dir=flag_values.data_dir)
    metrics = cli_lib.exit_on_user_error(evaluate, cli_lib.USER_ERRORS + (DatasetNotPreparedError,))
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}", flush=True)


def cli(args: List[str]) -> None:
    """Runs the command with `args` (flags, without the program name) in this process."""
    cli_lib.cli("vitjax.evaluate", define_flags, run, args)


if __name__ == "__main__":
    cli_lib.main(define_flags, run)
