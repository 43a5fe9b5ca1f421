"""Run a teacher once over a student run's exact train batches and store its top-k probabilities (TinyViT).

    python -m vitjax.distill.save_logits --config=configs/tiny_vit_distill.py:runlocal
    python -m vitjax.distill.save_logits --config=CFG --teacher=NAME --teacher_init=PATH --out=DIR --topk=10

The config is the student's: objective "distill" with `objective_kwargs.teacher` / `teacher_init` (or
--teacher / --teacher_init) and `teacher_logits` (or --out), the directory written. The batches are the
ones the student run will draw, step for step: the same input pipeline, seed and global batch, the same
mixup / cutmix from the same step keys (`vitjax.train.split_run_key`), so the teacher sees each
augmented image the student will see. For every batch the teacher's top-k softmax probabilities, their
classes and each image's fingerprint are kept (see `vitjax.distill.stored`). Each process writes only its
own rows, in files of --batches_per_file batches, each written whole then renamed: rerunning the same
command after a kill skips the complete files and continues. The student then trains with
`python -m vitjax.main --config=CFG` and never runs the teacher.
"""
import copy
import math
import os
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import numpy as np

from vitjax import parallel
from vitjax import train as trainer
from vitjax.distill import stored
from vitjax.objectives import distill as distill_objective

DEFAULT_BATCHES_PER_FILE = 500


def _local_rows(array: jax.Array, mesh) -> np.ndarray:
    """Returns this process's rows of a batch-sharded global array, in batch order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        array, mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES)))


def _store_config(config, *, out, teacher, teacher_init, topk):
    """Returns (the student config with the overrides, the store directory)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        kwargs = config.objective_kwargs
        for key, value in (("teacher_logits", out), ("teacher", teacher), ("teacher_init", teacher_init),
                           ("topk", topk)):
            if value is not None:
                kwargs[key] = value
    if config.objective != "distill":
        raise ValueError(f"save_logits needs a distillation config (objective 'distill'), got objective "
                         f"{config.objective!r}")
    directory = config.objective_kwargs.get("teacher_logits")
    if not directory:
        raise ValueError("Where to write? Set objective_kwargs.teacher_logits in the config or pass --out=DIR")
    return config, os.path.abspath(directory)


def save_logits(config, *, out: Optional[str] = None, teacher: Optional[str] = None,
                teacher_init: Optional[str] = None, topk: Optional[int] = None, value_dtype: str = "float16",
                batches_per_file: int = DEFAULT_BATCHES_PER_FILE, mesh=None, show_progress: bool = True
                ) -> Dict[str, Any]:
    """Returns {"directory", "files_written", "files_kept", "batches", "seconds", "images_per_sec"} after storing.

    Every check (config, teacher weights, an existing store of another recipe) runs before the teacher compiles.
    """
    if value_dtype not in stored.VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {stored.VALUE_DTYPES}, got {value_dtype!r}")
    if isinstance(batches_per_file, bool) or not isinstance(batches_per_file, int) or batches_per_file < 1:
        raise ValueError(f"batches_per_file must be an int >= 1, got {batches_per_file!r}")
    online, directory = _store_config(config, out=out, teacher=teacher, teacher_init=teacher_init, topk=topk)
    # The teacher runs online here: the same objective (on a copy of the config), built without the store.
    with online.unlocked():
        online.objective_kwargs["teacher_logits"] = None
        online.objective_kwargs["distillation_type"] = "soft_target"
    online, objective = trainer.build(online)
    import vitjax.data as data  # pylint: disable=g-import-not-at-top  # TensorFlow, only when saving
    info = data.dataset_info(online.input)
    num_batches, _ = trainer.steps_from_config(online, info.get("num_train_examples"))
    k = int(online.objective_kwargs["topk"])
    settings = stored.recipe(online)
    meta = dict(format=stored.FORMAT, recipe=settings, recipe_hash=stored.recipe_hash(settings),
                num_batches=num_batches, batches_per_file=batches_per_file, topk=k, value_dtype=value_dtype,
                num_classes=objective.num_classes, teacher=online.objective_kwargs["teacher"],
                teacher_init=str(online.objective_kwargs["teacher_init"]))
    if os.path.exists(os.path.join(directory, stored.META)):
        saved = stored.read_meta(directory)
        differing = [key for key in ("format", "recipe_hash", "num_batches", "batches_per_file", "topk",
                                     "value_dtype", "num_classes", "teacher", "teacher_init")
                     if saved.get(key) != meta[key]]
        if differing:
            raise ValueError(f"{directory} holds a store written with other settings ({', '.join(differing)} "
                             f"differ); choose another --out or delete it")

    mesh = mesh or parallel.create_mesh(online.mesh)
    trainer.check_batch_sizes(online, mesh, online.eval_batch_size or online.batch_size)  # as the student run will
    local_batch = online.batch_size // jax.process_count()
    rules = parallel.logical_rules(online.sharding_rules)
    keys = ("image", "label")
    first_batch = next(data.make_train_iterator(online.input, global_batch_size=online.batch_size,
                                                seed=online.seed))
    example = {key: np.zeros((1,) + first_batch[key].shape[1:], first_batch[key].dtype) for key in keys}
    abstract = jax.eval_shape(lambda r: objective.init_variables(r, example), jax.random.PRNGKey(0))
    collection = distill_objective.TEACHER
    teacher_variables = trainer.place_params(trainer.load_frozen_weights(objective, abstract)[collection],
                                             parallel.logical_shardings(abstract[collection], mesh, rules))
    with parallel.use_mesh(mesh), nn.logical_axis_rules(rules):
        transform = data.make_batch_transform(online.input, objective.num_classes)
        _, train_key = trainer.split_run_key(jax.random.PRNGKey(online.seed))

        @jax.jit
        def teacher_step(variables, batch, batch_index):
            batch = transform(batch, jax.random.fold_in(train_key, batch_index))
            values, indices = stored.top_k_probabilities(objective.teacher_logits(variables, batch["image"]), k)
            return values.astype(value_dtype), indices, stored.fingerprint(batch["image"])

        if jax.process_index() == 0:
            stored.write_meta(directory, meta)
        written = kept = computed = 0
        start = time.time()
        progress = trainer.progress_bar(show_progress and jax.process_index() == 0, num_batches, 0, desc="teacher")
        for first in stored.file_starts(num_batches, batches_per_file):
            path = stored.file_path(directory, jax.process_index(), first)
            count = min(batches_per_file, num_batches - first)
            if stored.check_file(path, stored.expected_arrays(meta, first)) is None:
                kept += 1
                progress.update(count)
                continue
            batches = data.prefetch_to_device(
                ({key: batch[key] for key in keys} for batch in data.make_train_iterator(
                    online.input, global_batch_size=online.batch_size, seed=online.seed, start_step=first)),
                2, parallel.batch_sharding(mesh))
            rows = {"values": [], "indices": [], "fingerprint": []}
            try:
                for index in range(first, first + count):
                    outputs = teacher_step(teacher_variables, next(batches), np.int32(index))
                    for name, value in zip(rows, outputs):
                        rows[name].append(_local_rows(value, mesh))
                    progress.update(1)
                    computed += 1
            finally:
                batches.close()
            stored.write_file(path, *(np.stack(rows[name]) for name in ("values", "indices", "fingerprint")))
            written += 1
        progress.close()
    seconds = time.time() - start
    return dict(directory=directory, files_written=written, files_kept=kept, batches=num_batches,
                local_batch=local_batch, seconds=seconds,
                images_per_sec=computed * online.batch_size / seconds if computed and seconds > 0 else math.nan)


def main(argv) -> None:
    """The command line (see the module doc)."""
    del argv
    from absl import flags, logging  # pylint: disable=g-import-not-at-top
    values = flags.FLAGS
    parallel.maybe_initialize_distributed()
    summary = save_logits(values.config, out=values.out, teacher=values.teacher, teacher_init=values.teacher_init,
                          topk=values.topk, value_dtype=values.value_dtype,
                          batches_per_file=values.batches_per_file)
    logging.info("Stored teacher probabilities: %s", summary)
    print(f"{summary['directory']}: {summary['batches']} batches x {summary['local_batch']} images per process, "
          f"{summary['files_written']} files written, {summary['files_kept']} kept, {summary['seconds']:.1f} s")


if __name__ == "__main__":
    from absl import app, flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    config_flags.DEFINE_config_file("config", None, "The student's config (objective 'distill').", lock_config=False)
    flags.DEFINE_string("out", None, "Directory to write (default: objective_kwargs.teacher_logits).")
    flags.DEFINE_string("teacher", None, "Teacher model name (default: objective_kwargs.teacher).")
    flags.DEFINE_string("teacher_init", None, "Teacher weights (default: objective_kwargs.teacher_init).")
    flags.DEFINE_integer("topk", None, "Probabilities kept per image (default: objective_kwargs.topk, 10).")
    flags.DEFINE_enum("value_dtype", "float16", list(stored.VALUE_DTYPES), "dtype of the stored probabilities.")
    flags.DEFINE_integer("batches_per_file", DEFAULT_BATCHES_PER_FILE, "Batches per file.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
