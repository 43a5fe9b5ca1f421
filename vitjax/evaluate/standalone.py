"""Any evaluator kind on the weights of a finished (or running) vitjax run, without training.

    metrics = evaluate_run("/tmp/gmml_local", {"probe": dict(kind="linear_probe"), "ten": dict(kind="fewshot")})
    python -m vitjax.evaluate --init_from=/tmp/gmml_local --kind=fewshot --eval_set=shots=(1,10)

The run's `config.json` says the objective (whose `features` the kNN, probe and few-shot kinds read),
the model and the data; its newest checkpoint (or `PATH@STEP`) gives the weights, loaded through
`config.init_from` as a new run would. The evaluators are the trainer's (`config.evals` settings).
"""
from typing import Any, Callable, Dict, Mapping, Optional


def run_config(init_from: str) -> Dict[str, Any]:
    """Returns the JSON config of the vitjax run `init_from` (a workdir, or `PATH@STEP`), over today's defaults."""
    from vitjax import config_utils, weights
    weights.check_source(init_from)
    meta = dict(weights.load(init_from).meta or {})
    saved = meta.get("config")
    if not saved:
        raise ValueError(f"{init_from!r} is not a vitjax run: evaluators other than classification read an objective's "
                         "features, so they need a run's workdir (its config.json names the objective and data)")
    defaults = config_utils.config_as_json(config_utils.default_config())
    # Keys a workdir written by an older vitjax lacks count at their defaults.
    return {**defaults, **saved, "optim": {**defaults["optim"], **saved.get("optim", {})}}


def evaluate_run(init_from: str, evals: Mapping[str, Mapping[str, Any]], *, dataset: Optional[str] = None,
                 data_dir: Optional[str] = None, log: Callable[[str], None] = print) -> Dict[str, float]:
    """Returns {"<name>/<metric>": value} of the evaluators `evals` ({name: settings}) on the run's weights."""
    import contextlib

    import flax.linen as nn
    import jax
    import ml_collections

    import vitjax.data as data
    from vitjax import parallel, train
    from vitjax.evaluate import evaluators
    config = ml_collections.ConfigDict(run_config(init_from))
    config.init_from = init_from
    config.evals = {name: dict(settings) for name, settings in evals.items()}
    if dataset is not None:
        config.input.dataset = dataset
    if data_dir is not None:
        config.input.data_dir = data_dir
    config, objective = train.build(config)
    info = data.dataset_info(config.input)
    total_steps, steps_per_epoch = train.steps_from_config(config, info.get("num_train_examples"))
    mesh = parallel.create_mesh(config.mesh)
    first = next(data.make_train_iterator(config.input, global_batch_size=config.batch_size, seed=0))
    example = {key: first[key] for key in objective.batch_keys}
    setup = train.create_train_setup(config, objective, mesh, example, total_steps=total_steps,
                                     steps_per_epoch=steps_per_epoch)
    with contextlib.ExitStack() as stack:
        stack.enter_context(parallel.use_mesh(mesh))
        stack.enter_context(nn.logical_axis_rules(setup.rules))
        plan = train.plan_init_from(config, objective, setup.abstract_variables)
        log(plan.table())
        state = train.initial_state(setup, jax.random.key(config.seed), plan)
        built = evaluators.build_evaluators(config, evaluators.EvalContext(
            objective=objective, input_config=config.input, mesh=mesh, state_shardings=setup.state_shardings,
            batch_sharding=setup.batch_sharding, eval_batch_size=config.eval_batch_size or config.batch_size,
            default_every_steps=0, data=data))
        return evaluators.run_evaluators(built, state, step=0, is_last=True, log=log)


__all__ = ["evaluate_run", "run_config"]
