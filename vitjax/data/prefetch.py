"""Moving host batches onto devices ahead of time, for jit with `jax.sharding` shardings."""
import queue
import threading
from typing import Any, Iterable, Iterator

import jax

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch_to_device(iterator: Iterable[Any], size: int, sharding) -> Iterator[Any]:
    """Returns an iterator of `iterator`'s batches as global jax.Arrays, `size` batches ahead.

    Each leaf of a batch is this process's slice of the global batch along axis 0; it becomes a
    global array with `jax.make_array_from_process_local_data(sharding, leaf)`. `sharding` is a
    `jax.sharding.Sharding` used for every leaf (e.g. NamedSharding(mesh, P("data"))), or a
    pytree of shardings matching the batch. A background thread does the transfers, so the next
    batches are on the devices while the current step runs; errors are re-raised here.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}.")
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(batch):
        if isinstance(sharding, jax.sharding.Sharding):
            return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(sharding, leaf),
                                batch)
        return jax.tree.map(lambda leaf, leaf_sharding: jax.make_array_from_process_local_data(
            leaf_sharding, leaf), batch, sharding)

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in iterator:
                if not offer(put(batch)):
                    return
            offer(_END)
        except BaseException as error:  # pylint: disable=broad-except
            offer(_Failure(error))

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()

    def consume():
        try:
            while True:
                item = buffer.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()  # The consumer went away (or finished): let the thread end ...
            # ... and wait for it: a daemon thread still inside TensorFlow's C++ when the interpreter
            # exits is unwound by force, and TF's catch-all aborts the process ("FATAL: exception not
            # rethrown", status -6) instead of exiting with the run's status.
            thread.join(timeout=30.0)

    return consume()
