"""Parameter groups a model declares for the optimizer, as timm's `group_matcher` and `no_weight_decay`.

Every family's top-level Module has two methods the optimizer reads (through the objective):

    ids, num_layers = model.layer_ids(params)   # layer-wise lr decay: lr scale decay ** (num_layers + 1 - id)
    patterns = model.no_weight_decay()          # regexes (re.search) of param paths never weight-decayed

`layer_ids` numbers the groups that `model.group_matcher()` declares. Paths are "/"-joined param names,
e.g. "layers_1/blocks_0/attn/qkv/kernel": timm's module names with "." -> "/" and a list index ".3" ->
"_3" (see vitjax/convert/*.py). 1-D params and biases are never weight-decayed (vitjax.optim), so
`no_weight_decay` lists only the rest (tokens, position embeddings, bias tables).

A matcher is written as timm writes `group_matcher(coarse=False)`: an ordered dict of group name -> a
regex, or a list of (regex, suffix) pairs. `layer_ids_from_matcher` numbers the params exactly as timm's
`group_with_matcher` + `param_groups_layer_decay`:

  * a path's sort key is (index of the first dict entry whose regex matches, re.match, at the start of
    the path; the regex's captured integers; the suffix); a path no regex matches (the head) sorts last;
  * the distinct keys, in order, get ids 0, 1, 2, ...; a key whose suffix ends in MERGE_WITH_PREVIOUS
    (timm's MATCH_PREV_GROUP, e.g. the final norm) takes the id of the key before it;
  * the largest id gets lr scale 1, so `num_layers` is that id - 1.

E.g. Swin: stem=r"^patch_embed", blocks=[(r"^layers_(\\d+)/downsample", (0,)),
(r"^layers_(\\d+)/blocks_(\\d+)", None), (r"^norm", (MERGE_WITH_PREVIOUS,))]: the patch embedding is 0,
stage i's downsample shares the id of its first block, the final norm that of the last block, the head
is last. A wrapper (MAE, a linear probe) numbers its params with `scoped_matcher(encoder.group_matcher(),
"encoder")`: its own params match nothing and join the last group.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

# A group whose suffix ends in this joins the group sorted before it (timm's MATCH_PREV_GROUP).
MERGE_WITH_PREVIOUS = 99999

LayerIds = Union[int, List[int]]
# group name -> regex, or [(regex, suffix tuple or None), ...]; None skips the entry (timm's convention).
Matcher = Mapping[str, Union[None, str, Sequence[Tuple[str, Optional[Tuple[int, ...]]]]]]


def _path_str(path) -> str:
    """Returns the "/"-joined name of a jax key path."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _compile(matcher: Matcher) -> List[Tuple[re.Pattern, Tuple[float, ...], Tuple[float, ...]]]:
    """Returns [(compiled regex, (group ordinal,), suffix)] in matching order."""
    compiled = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        if isinstance(spec, str):
            compiled.append((re.compile(spec), (float(ordinal),), ()))
            continue
        for regex, suffix in spec:
            compiled.append((re.compile(regex), (float(ordinal),), tuple(float(s) for s in (suffix or ()))))
    return compiled


def _sort_key(name: str, compiled) -> Tuple[float, ...]:
    """Returns the sort key of one param name: (ordinal, captured integers..., suffix...), or (inf,)."""
    for regex, prefix, suffix in compiled:
        found = regex.match(name)
        if found:
            captured = tuple(float(group) for group in found.groups() if group is not None)
            return prefix + captured + suffix
    return (float("inf"),)


def number_groups(names: Sequence[str], matcher: Matcher) -> Dict[str, int]:
    """Returns {name: layer id} for param `names` grouped and numbered by `matcher` (timm's group_with_matcher)."""
    compiled = _compile(matcher)
    keys = {name: _sort_key(name, compiled) for name in names}
    ids_of_key: Dict[Tuple[float, ...], int] = {}
    layer_id = -1
    for key in sorted(set(keys.values())):
        if layer_id < 0 or key[-1] != MERGE_WITH_PREVIOUS:
            layer_id += 1
        ids_of_key[key] = layer_id
    return {name: ids_of_key[key] for name, key in keys.items()}


def layer_ids_from_matcher(params: Any, matcher: Matcher, stacked: Sequence[str] = ()
                           ) -> Tuple[Dict[str, LayerIds], int]:
    """Returns ({path: layer id}, num_layers) for `params` numbered by `matcher` (see the module doc).

    `stacked`: path prefixes (e.g. "blocks") of params that carry a leading "layers" axis (an `nn.scan`
    over blocks); their layer i is matched as "blocks_i/..." and the path gets a list of one id per layer.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    expanded: Dict[str, List[str]] = {}
    for key_path, leaf in flat:
        path = _path_str(key_path)
        prefix = next((prefix for prefix in stacked if path.startswith(prefix + "/")), None)
        if prefix is None:
            expanded[path] = [path]
        else:
            rest = path[len(prefix) + 1:]
            expanded[path] = [f"{prefix}_{index}/{rest}" for index in range(int(np.shape(leaf)[0]))]
    ids = number_groups([name for names in expanded.values() for name in names], matcher)
    result: Dict[str, LayerIds] = {}
    for path, names in expanded.items():
        per_layer = [ids[name] for name in names]
        result[path] = per_layer if names[0] != path else per_layer[0]
    largest = max((max(np.ravel(value)) for value in result.values()), default=0)
    return result, int(largest) - 1


def _scoped(regex: str, scope: str) -> str:
    """Returns a regex that matches "scope/<path>" where `regex` matches <path>."""
    if regex.startswith("^"):
        return f"^{re.escape(scope)}/(?:{regex[1:]})"
    return f"^{re.escape(scope)}/.*(?:{regex})"


def scoped_matcher(matcher: Matcher, scope: str) -> Matcher:
    """Returns `matcher` for a model whose params sit under "scope/" of a wrapper's params; the wrapper's own
    params match nothing, so they join the last group, as timm's unmatched head. A regex anchored with "^"
    must anchor all its alternatives (write "^(?:a|b)", not "^a|b")."""
    result: Dict[str, Any] = {}
    for name, spec in matcher.items():
        if spec is None or isinstance(spec, str):
            result[name] = spec if spec is None else _scoped(spec, scope)
        else:
            result[name] = [(_scoped(regex, scope), suffix) for regex, suffix in spec]
    return result


def scoped_patterns(patterns: Sequence[str], scope: str) -> Tuple[str, ...]:
    """Returns `patterns` (regexes searched in a sub-tree's paths) rewritten for that sub-tree under "scope/"."""
    return tuple(_scoped(pattern, scope) for pattern in patterns)


class LayerGroups:
    """Mixin for a model Module that declares `group_matcher()`: `layer_ids` numbered as timm numbers its groups."""

    def layer_ids(self, params: Any) -> Tuple[Dict[str, LayerIds], int]:
        """Returns ({path: layer id}, num_layers) for layer-wise lr decay, numbered by `group_matcher`."""
        return layer_ids_from_matcher(params, self.group_matcher())
