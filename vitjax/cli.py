"""What the command-line tools share: absl flags on their own FlagValues, KEY=VALUE settings, clean exits.

Each tool (`python -m vitjax.convert`, `vitjax.evaluate`, `vitjax.evaluate.mae_viz`) has
`define_flags(flag_values)` and `run(flag_values)`. As a program it defines its flags in absl's global
FLAGS and runs under `absl.app` (--help, --helpfull); tests call `cli(args)` instead, which parses
`args` into fresh FlagValues, so tools whose flags share names (--model, --checkpoint) coexist in
one process.
"""
import ast
import sys
from typing import Any, Callable, List, Sequence, Tuple

from absl import app, flags, logging

# Errors that are the user's (bad names, values, paths): one line, no traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


def parse_setting(text: str) -> Tuple[str, Any]:
    """Returns (key, value) from "key=value", the value read as a Python literal when it is one."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set takes KEY=VALUE (e.g. --set=depth=6), got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def exit_on_user_error(function: Callable[[], Any], errors: Tuple[type, ...] = USER_ERRORS) -> Any:
    """Returns `function()`, or exits with "FATAL: <message>" (no traceback) if it raises one of `errors`."""
    try:
        return function()
    except errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"FATAL: {message}")


def cli(program: str, define_flags: Callable[[flags.FlagValues], None], run: Callable[[flags.FlagValues], Any],
        args: Sequence[str]) -> Any:
    """Returns `run`'s result for flag arguments `args` (no program name), parsed into fresh FlagValues."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        flag_values([program] + list(args))
    except flags.Error as error:
        sys.exit(f"FATAL flags error: {error}")
    return run(flag_values)


def main(define_flags: Callable[[flags.FlagValues], None], run: Callable[[flags.FlagValues], Any]) -> None:
    """Runs a tool as a program: its flags in absl's FLAGS, parsed by `absl.app` (which also gives --help)."""
    define_flags(flags.FLAGS)

    def absl_main(argv: List[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]} (flags are --name=value)")
        if not flags.FLAGS["verbosity"].present:
            # The libraries' INFO logs (TFDS, orbax) would bury the tool's printed result; -v 0 shows them.
            logging.set_verbosity(logging.WARNING)
        run(flags.FLAGS)

    app.run(absl_main)
