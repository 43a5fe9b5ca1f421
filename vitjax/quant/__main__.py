r"""Command line: post-training quantization of any weights, printing FP32 and quantized top-1.

    # a vitjax workdir (e.g. the quickstart's): its config.json gives the model, data and preprocessing
    python -m vitjax.quant --init_from=/tmp/vitjax_digits --method=adalog --w_bits=4 --a_bits=4
    # converted or timm weights: name the model and the dataset
    python -m vitjax.quant --init_from=deit_s.pth --model=deit_small_patch16_224 --dataset=imagenet2012 \
        --method=adalog --w_bits=6 --a_bits=6

The weights are read and fitted as `python -m vitjax.evaluate` does (`vitjax.evaluate.pretrained`);
the calibration images are the first --calib_batches batches of --calib_batch_size images of the
training split (the run's `train_split`, else "train"), preprocessed as the evaluation split.
Flags as `vitjax.evaluate` (--init_from, --model, --set, --dataset, --split, --data_dir, --pp,
--image_size, --batch_size, --num_examples), plus --method (one of `vitjax.quant.METHODS`), --w_bits,
--a_bits (2..8), --act_granularity (tensor | token), --weight_granularity (channel | tensor),
--calib_split, --calib_batches, --calib_batch_size. Bad input stops, before anything compiles, with a
message naming the valid choices.
"""
from typing import Callable, List, Optional

from absl import flags

from vitjax import cli as cli_lib
from vitjax.evaluate import __main__ as evaluate_cli


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines this command's flags in `flag_values`: vitjax.evaluate's and the quantization's."""
    evaluate_cli.define_flags(flag_values)
    flags.DEFINE_string("method", "adalog", "Quantization method: minmax, percentile, mse, log2 or adalog.",
                        flag_values=flag_values)
    flags.DEFINE_integer("w_bits", 8, "Kernel bit width (2..8).", flag_values=flag_values)
    flags.DEFINE_integer("a_bits", 8, "Activation bit width (2..8).", flag_values=flag_values)
    flags.DEFINE_string("act_granularity", "tensor", "Uniform activation grids: tensor (static) or token (dynamic).",
                        flag_values=flag_values)
    flags.DEFINE_string("weight_granularity", "channel", "Kernel grids: channel or tensor.", flag_values=flag_values)
    flags.DEFINE_string("calib_split", None, "Split of the calibration images (default: the run's train split, "
                        "else train).", flag_values=flag_values)
    flags.DEFINE_integer("calib_batches", 4, "Number of calibration batches.", flag_values=flag_values)
    flags.DEFINE_integer("calib_batch_size", 32, "Images per calibration batch.", lower_bound=1,
                         flag_values=flag_values)


def calibration_images(input_config: dict, split: Optional[str], num_batches: int, batch_size: int):
    """Returns (split, the first `num_batches` image batches of it), preprocessed as the evaluation split."""
    import itertools

    import vitjax.data as data
    config = {key: value for key, value in input_config.items() if key != "train_split"}
    split = split or input_config.get("train_split") or "train"
    batches = data.make_eval_iterator(dict(config, eval_split=split), global_batch_size=batch_size)
    return split, [batch["image"] for batch in itertools.islice(batches, num_batches)]


def logits_fn(qmodel) -> Callable:
    """Returns logits(qvariables, images): the quantized model's eval fp32 logits (a distilled model's head mean)."""
    import jax.numpy as jnp

    def logits(variables, images):
        output, _ = qmodel.apply(variables, images, train=False)
        if isinstance(output, (tuple, list)):
            output = sum(output) / len(output)
        return output.astype(jnp.float32)

    return logits


def quantize_and_evaluate(flag_values: flags.FlagValues, log=print) -> dict:
    """Returns {"fp32": EvalResult, "quantized": EvalResult, "model": QuantizedModel} as the flags say."""
    import jax

    from vitjax import quant
    from vitjax.evaluate import pretrained
    quant.check_arguments(flag_values.method, flag_values.w_bits, flag_values.a_bits, flag_values.act_granularity,
                          flag_values.weight_granularity)
    if flag_values.calib_batches < 1:
        raise ValueError(f"--calib_batches must be >= 1 (a calibration set of zero batches), got "
                         f"{flag_values.calib_batches}")
    overrides = dict(cli_lib.parse_setting(item) for item in flag_values.set)
    prepared = pretrained.prepare_pretrained(
        flag_values.init_from, model_name=flag_values.model, model_overrides=overrides, dataset=flag_values.dataset,
        split=flag_values.split, data_dir=flag_values.data_dir, pp=flag_values.pp, image_size=flag_values.image_size,
        log=log)
    calib_split, calibration = calibration_images(prepared.input_config, flag_values.calib_split,
                                                  flag_values.calib_batches, flag_values.calib_batch_size)
    module = prepared.objective.module
    log(f"Calibrating {flag_values.method} W{flag_values.w_bits}A{flag_values.a_bits} on {len(calibration)} "
        f"batches of {calib_split}")
    qmodel, qvariables = quant.quantize(module, prepared.variables, calibration, method=flag_values.method,
                                        w_bits=flag_values.w_bits, a_bits=flag_values.a_bits,
                                        act_granularity=flag_values.act_granularity,
                                        weight_granularity=flag_values.weight_granularity,
                                        apply_kwargs=dict(train=False))
    log(qmodel.summary())

    kwargs = dict(batch_size=flag_values.batch_size, num_examples=flag_values.num_examples, log=log)
    fp32 = pretrained.evaluate_prepared(prepared, **kwargs)
    quantized = pretrained.evaluate_prepared(prepared, variables=jax.device_put(qvariables),
                                             logits_fn=logits_fn(qmodel), **kwargs)
    return {"fp32": fp32, "quantized": quantized, "model": qmodel}


def run(flag_values: flags.FlagValues) -> dict:
    """Quantizes and evaluates as the parsed `flag_values` say, prints both top-1; exits with one line on bad input."""
    from vitjax.data import DatasetNotPreparedError
    from vitjax.evaluate import pretrained
    results = cli_lib.exit_on_user_error(lambda: quantize_and_evaluate(flag_values),
                                         cli_lib.USER_ERRORS + (DatasetNotPreparedError,))
    print(f"FP32: {pretrained.summary(results['fp32'])}")
    label = f"{flag_values.method} W{flag_values.w_bits}A{flag_values.a_bits}"
    print(f"{label}: {pretrained.summary(results['quantized'])}", flush=True)
    return results


def cli(args: List[str]) -> dict:
    """Runs the command with `args` (flags, without the program name) in this process; returns the results."""
    return cli_lib.cli("vitjax.quant", define_flags, run, args)


if __name__ == "__main__":
    cli_lib.main(define_flags, run)
