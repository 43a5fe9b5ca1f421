"""AdaLog's full calibration pipeline, as its official code runs it (`QuantCalibrator.batching_quant_calib`).

Per layer, on full-precision calibration inputs (`vitjax.quant.search` for the uniform grids):
* post-LayerNorm layers (qkv, fc1, patch merging's reduction), when w_bits == a_bits as the official code
  requires: the input grid per channel by its own error, folded into the LayerNorm and the layer
  (`vitjax.quant.reparam`), then the layer calibrated as any other on the reparameterised input;
* post-GELU layers (fc2): the kernel grid by its own error, then `SEARCH_ROUNDS` times AdaLog's base and scale
  (FPCS, `quantizers.search_adalog_gelu`) and the kernel grid by the output error;
* every other Dense / DenseGeneral and patch-embedding Conv (`search.calibrate_linear`): the first layer's
  input at 8 bits; a Conv that is not a patch embedding gets the grids of their own error only;
* attention: q and k per head (`search.calibrate_scores`), the post-softmax base and v per head
  (`search.calibrate_mixing`).
"""
from typing import Any, Dict, Mapping, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from vitjax.quant import quantizers, reparam, search

FIRST_LAYER_BITS = 8


def _lookup(tree: Any, path: Tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def layer_matrix(point: Any, x: np.ndarray, kernel: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (inputs (R, I), kernel (I, O)) of a layer point as one matrix product (patches for a Conv)."""
    kernel = np.asarray(kernel, np.float32)
    x = np.asarray(x, np.float32)
    in_ndim = kernel.ndim - len(point.output_axes)
    if point.conv and not point.patch:
        return x.reshape(-1, x.shape[-1]), kernel.reshape(-1, kernel.shape[-1])
    if point.patch:
        # (B, H, W, C) -> patches in the kernel's (h, w, c) order
        (ph, pw), (b, h, w, c) = point.patch, x.shape
        x = x[:, :h - h % ph, :w - w % pw].reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
        in_ndim = kernel.ndim - 1
    columns = int(np.prod(kernel.shape[:in_ndim]))
    return x.reshape(-1, columns), kernel.reshape(columns, -1)


def _kernel_grid(grid: search.Grid, kernel_shape: Sequence[int], output_axes: Sequence[int]) -> Dict[str, Any]:
    out_shape = tuple(kernel_shape[axis] for axis in output_axes)
    shape = (1,) * (len(kernel_shape) - len(out_shape)) + out_shape
    return {"scale": jnp.asarray(grid[0].reshape(shape)), "zero_point": jnp.asarray(grid[1].reshape(shape))}


def _tensor_grid(grid: search.Grid) -> Dict[str, Any]:
    return {"scale": jnp.asarray(grid[0].reshape(())), "zero_point": jnp.asarray(grid[1].reshape(()))}


def _head_grid(grid: search.Grid) -> Dict[str, Any]:
    return {"scale": jnp.asarray(grid[0].reshape(1, 1, -1, 1)), "zero_point": jnp.asarray(grid[1].reshape(1, 1, -1, 1))}


def calibrate(points: Sequence[Any], softmax_names: Sequence[str], operand_names: Sequence[str], recorder: Any,
              params: Any, w_bits: int, a_bits: int, pairs: Mapping[str, Tuple[str, ...]],
              rounds: int = search.SEARCH_ROUNDS) -> Dict[str, Any]:
    """Returns {"params": reparameterised params, "kernels", "inputs", "gelu_q", "softmax_q", "operands"} of
    AdaLog's pipeline over recorded calibration data (`recorder` kept every value of every point).

    kernels / inputs / operands hold the grids in the layout of `vitjax.quant.QuantizedModel`; gelu_q and
    softmax_q the searched AdaLog bases per point.
    """
    params = reparam.mutable_copy(params)
    kernels, inputs, gelu_q, softmax_q, operands = {}, {}, {}, {}, {}
    for index, point in enumerate(points):
        bits = max(a_bits, FIRST_LAYER_BITS) if index == 0 else a_bits
        kernel_full = np.asarray(_lookup(params, point.kernel_path), np.float32)
        bias_path = point.kernel_path[:-1] + ("bias",)
        bias = np.asarray(_lookup(params, bias_path), np.float32).reshape(-1) if point.has_bias else None
        x, _ = recorder.concatenated(point.name)
        x, kernel = layer_matrix(point, x, kernel_full)
        kind = "conv" if point.patch else "weight"
        if point.name in pairs and w_bits == a_bits:
            channel_grid = search.search_input_self(x, bits, channel_wise=True)
            r, b, _, _ = reparam.fold(*channel_grid)
            norm_path = pairs[point.name]
            norm, kernel, bias = reparam.apply_fold(_lookup(params, norm_path), kernel, bias, r, b)
            reparam.set_path(params, norm_path, {**_lookup(params, norm_path), **{k: jnp.asarray(v)
                                                                                  for k, v in norm.items()}})
            reparam.set_path(params, point.kernel_path, jnp.asarray(kernel.reshape(kernel_full.shape)))
            bias_shape = np.shape(_lookup(params, bias_path))
            reparam.set_path(params, bias_path, jnp.asarray(bias.reshape(bias_shape)))
            x = x / r - b
        if point.post_gelu:
            weight_grid, (scale, q) = calibrate_post_gelu(x, kernel, bias, w_bits, bits, rounds)
            inputs[point.name] = {"scale": jnp.asarray(scale, jnp.float32)}
            gelu_q[point.name] = q
        elif point.conv and not point.patch:
            weight_grid = search.search_weight_self(kernel, w_bits, "conv")
            inputs[point.name] = _tensor_grid(search.search_input_self(x, bits))
        else:
            weight_grid, input_grid = search.calibrate_linear(x, kernel, bias, w_bits, bits, rounds, kind=kind)
            inputs[point.name] = _tensor_grid(input_grid)
        kernels[point.name] = _kernel_grid(weight_grid, kernel_full.shape, point.output_axes)
    for softmax_name in softmax_names:
        attention, value = recorder.concatenated(softmax_name)
        operand_name = softmax_name.rsplit("softmax_", 1)[0] + "operands_" + softmax_name.rsplit("softmax_", 1)[1]
        if operand_name not in operand_names:
            # q, k and v stay in full precision: the base alone, as the official search with v unquantized
            softmax_q[softmax_name] = quantizers.search_adalog_softmax(attention, value, a_bits,
                                                                       num_candidates=search.EQ_N)
            continue
        query, key, value = recorder.joined_operands(operand_name)
        query_grid, key_grid = search.calibrate_scores(query, key, a_bits, rounds)
        q, value_grid = search.calibrate_mixing(attention, value, a_bits, a_bits, rounds)
        softmax_q[softmax_name] = q
        operands[operand_name] = {"query": _head_grid(query_grid), "key": _head_grid(key_grid),
                                  "value": _head_grid(value_grid)}
    return {"params": params, "kernels": kernels, "inputs": inputs, "gelu_q": gelu_q, "softmax_q": softmax_q,
            "operands": operands}


def calibrate_post_gelu(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, w_bits: int, a_bits: int,
                        rounds: int) -> Tuple[search.Grid, Tuple[float, int]]:
    """Returns (kernel grid, (AdaLog scale, q)) of a post-GELU layer, as `PostGeluLogBasedBatchingQuantLinear`."""
    bias = np.zeros((kernel.shape[1],), np.float32) if bias is None else bias
    reference = x @ kernel + bias
    weight_grid = search.search_weight_self(kernel, w_bits)
    scale = None
    q = 0
    for _ in range(rounds):
        kernel_sim = search.quantize_array(kernel, weight_grid, w_bits)
        scale, q = quantizers.search_adalog_gelu(x, kernel, bias, a_bits, kernel_sim=kernel_sim, initial_scale=scale)
        x_sim = np.asarray(quantizers.adalog_quantize(jnp.asarray(x), scale, q, a_bits, quantizers.GELU_SHIFT))
        weight_grid = search.search_weight_output(kernel, bias, x_sim, reference, w_bits)
    return weight_grid, (scale, q)


__all__ = ["FIRST_LAYER_BITS", "calibrate", "calibrate_post_gelu", "layer_matrix"]
