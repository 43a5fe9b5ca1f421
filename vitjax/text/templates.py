"""Class names and caption templates: the data that turns a classification label into a caption.

    vitjax.text.templates.classnames("digits")   # ("zero", "one", ..., "nine")
    vitjax.text.templates.templates("imagenet")  # CLIP's 80 templates, "a bad photo of a {}." ...
    vitjax.text.templates.captions("digits", "digits")[7]   # every caption of class 7

Each template has one "{}" for the class name. Sets by name: "digits" (the bundled digits data) and
"imagenet" (CLIP's zero-shot prompts, `vitjax.text.imagenet_prompts`); a list or tuple of strings is
taken as it is, so a config can bring its own.
"""
from typing import Dict, Sequence, Tuple, Union

from vitjax.text import imagenet_prompts

# The bundled digits (scikit-learn's handwritten 8x8 digits), labels 0..9.
DIGITS_CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "a picture of the digit {}.",
    "a blurry image of the number {}.",
    "a low resolution photo of a {}.",
    "the digit {}, written by hand.",
    "a small image of the number {}.",
    "a scan of a handwritten {}.",
)

_CLASSNAMES: Dict[str, Tuple[str, ...]] = {"digits": DIGITS_CLASSNAMES,
                                           "imagenet": tuple(imagenet_prompts.CLASSNAMES)}
_TEMPLATES: Dict[str, Tuple[str, ...]] = {"digits": DIGITS_TEMPLATES,
                                          "imagenet": tuple(imagenet_prompts.TEMPLATES)}

Names = Union[str, Sequence[str]]


def _resolve(value: Names, table: Dict[str, Tuple[str, ...]], what: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"Unknown {what} set {value!r}; valid choices: {sorted(table)} (or a list of strings)")
        return table[value]
    values = tuple(value)
    if not values or not all(isinstance(item, str) and item for item in values):
        raise ValueError(f"{what} must be a set name ({sorted(table)}) or a non-empty list of strings, got {value!r}")
    return values


def classnames(name: Names) -> Tuple[str, ...]:
    """Returns the class names of the set `name` (or the given list), indexed by label."""
    return _resolve(name, _CLASSNAMES, "class name")


def templates(name: Names) -> Tuple[str, ...]:
    """Returns the caption templates of the set `name` (or the given list), each with one "{}"."""
    result = _resolve(name, _TEMPLATES, "template")
    bad = [template for template in result if template.count("{}") != 1]
    if bad:
        raise ValueError(f"A caption template needs exactly one '{{}}' for the class name; these do not: {bad[:3]}")
    return result


def captions(classnames_name: Names, templates_name: Names) -> Tuple[Tuple[str, ...], ...]:
    """Returns captions[label][template]: every template filled with every class name."""
    names, forms = classnames(classnames_name), templates(templates_name)
    return tuple(tuple(form.format(name) for form in forms) for name in names)


def register(name: str, *, classnames: Sequence[str] = None, templates: Sequence[str] = None) -> None:
    """Registers a set of class names and / or templates under `name` (a taken name raises)."""
    for values, table in ((classnames, _CLASSNAMES), (templates, _TEMPLATES)):
        if values is None:
            continue
        if name in table:
            raise ValueError(f"The set {name!r} is registered already; registered: {sorted(table)}")
        table[name] = _resolve(list(values), table, "template" if table is _TEMPLATES else "class name")
