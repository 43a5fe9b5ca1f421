"""vitjax.aot: the trainer's step compiled for a TPU topology on this CPU host (needs libtpu: the `aot` extra)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import aot, config_utils

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (pip install -e '.[aot]') holds the TPU compiler")

# A ViT small enough to compile in seconds, wide enough that every matrix splits over 4 chips.
TINY_VIT = dict(variant="S/16", num_classes=1000, img_size=64, embed_dim=256, depth=2, num_heads=4, mlp_dim=1024,
                dtype="bfloat16")


def _tiny_config(**mesh):
    config = config_utils.load_config("configs/vit_i1k.py:variant=S/16", {"batch_size": 32})
    config.model = dict(TINY_VIT)
    for axis, size in mesh.items():
        config.mesh[axis] = size
    return config


HLO = """HloModule jit_step, is_scheduled=true

%all-reduce-scatter (input: bf16[64,8]) -> bf16[16,8] {
  %input = bf16[64,8]{1,0} parameter(0)
  %all-reduce.1 = bf16[64,8]{1,0} all-reduce(%input), channel_id=7, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %slice = bf16[16,8]{1,0} dynamic-slice(%all-reduce.1), dynamic_slice_sizes={16,8}
}

%async_part.1 (p0: f32[4,8], /*index=1*/p1: f32[16,8]) -> f32[16,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %all-gather.2 = f32[16,8]{1,0} all-gather(%p0), channel_id=3, dimensions={0}
}

%async_part.2 (p0: f32[4,8]) -> f32[16,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %all-gather.3 = f32[16,8]{1,0} all-gather(%p0), channel_id=3, dimensions={0}
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ag = f32[16,8]{1,0} all-gather(%x), channel_id=9, dimensions={0}
  ROOT %t = (s32[], f32[4,8]) tuple(%c, %x)
}

%ring_cond (p: (u32[], f32[4,8])) -> pred[] {
  %p = (u32[], f32[4,8]) parameter(0)
  %limit = u32[]{:T(128)} constant(16)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT
}

%ring_body (p: (u32[], f32[4,8])) -> (u32[], f32[4,8]) {
  %p = (u32[], f32[4,8]) parameter(0)
  %two = u32[]{:T(128)} constant(2)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %cp2 = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=21
  %next = u32[]{:T(128)} add(%i, %two)
  ROOT %t = (u32[], f32[4,8]) tuple(%next, %x)
}

ENTRY %main.5_spmd (a: f32[4,8], /*index=1*/b: bf16[64,8]) -> f32[16,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[64,8]{1,0} parameter(1)
  %f1 = f32[16,8]{1,0} fusion(%a), kind=kCustom, calls=%async_part.1
  %f2 = f32[16,8]{1,0} fusion(%a), kind=kOutput, calls=%async_part.2
  %rs = bf16[16,8]{1,0} fusion(%b), kind=kCustom, calls=%all-reduce-scatter
  %cp = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%a), channel_id=11
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ring = (u32[], f32[4,8]) while(%init2), condition=%ring_cond, body=%ring_body
  ROOT %ar = f32[16,8]{1,0} all-reduce(%f1), channel_id=12, to_apply=%add
}
"""


def test_collective_bytes_counts_each_channel_once_and_loops_by_trip_count():
    collectives = aot.collective_bytes(HLO)
    # One all-gather split over two async fusions (channel 3: 512 B), plus 3 trips of another (channel 9).
    assert collectives["all-gather"] == 512 + 3 * 512
    assert collectives["reduce-scatter"] == 64 * 8 * 2       # the all-reduce inside all-reduce-scatter
    assert collectives["all-reduce"] == 16 * 8 * 4
    # The result half of the start tuple, plus a TPU windowed-einsum loop: a u32 counter stepping by 2 to 16
    # is 8 trips (read as 1 trip before, which hid most of DeiT B/16's FSDP gathers; README).
    assert collectives["collective-permute"] == 4 * 8 * 4 + 8 * 4 * 8 * 4
    assert collectives["all-to-all"] == 0


def test_bad_topology_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"v5e:4x4.*v5p"):
        aot.chip_of("v6:4x4")
    with pytest.raises(ValueError, match="generation in"):
        aot.chip_of("v5e")


@needs_libtpu
def test_fsdp_step_on_v5e_2x2_shards_every_large_leaf_and_gathers_params_once_per_pass():
    result = aot.compile_train_step(_tiny_config(data=1, fsdp=-1), "v5e:2x2")
    assert result.mesh_shape == {"data": 1, "fsdp": 4, "model": 1}
    state_shardings, _ = result.compiled.input_shardings[0]
    abstract = result.setup.abstract_state
    large = 0
    for part in ("params", "opt_state"):
        leaves = jax.tree.leaves(getattr(abstract, part))
        shardings = jax.tree.leaves(getattr(state_shardings, part),
                                    is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        assert len(leaves) == len(shardings)
        for leaf, sharding in zip(leaves, shardings):
            if np.prod(leaf.shape) >= 2**14:
                large += 1
                assert not sharding.is_fully_replicated, (part, leaf.shape, sharding)
                assert sharding.shard_shape(leaf.shape) != tuple(leaf.shape)
    assert large >= 3 * 10  # params, adam's mu and nu: 10+ matrices each

    report = aot.analyse(result)
    state_bytes = sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
    # Per chip: a quarter of the state (plus the small replicated leaves, TPU tile padding and the batch
    # shard), far from the whole state a replicated layout would hold.
    assert state_bytes / 4 <= report["argument_bytes"] <= state_bytes / 2
    assert report["fits"] and report["flops"] > 0

    # Analytic: every fsdp-sharded param is gathered in bf16 (the compute dtype) before its forward use,
    # and XLA gathers it again for the backward pass instead of keeping it: between one and two gathers.
    params = jax.tree.leaves(abstract.params)
    param_shardings = jax.tree.leaves(state_shardings.params, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    gathered = sum(np.prod(leaf.shape) * 2 for leaf, sharding in zip(params, param_shardings)
                   if not sharding.is_fully_replicated)
    all_gather = report["collectives"]["all-gather"]
    assert gathered <= all_gather <= 2 * gathered, (all_gather, gathered)
    assert report["mfu_ceiling"] <= 1.0 and report["step_seconds_lower_bound"] > 0


@needs_libtpu
def test_cli_reports_per_chip_figures_with_the_pallas_kernel(capsys, tmp_path, monkeypatch):
    """The trainer's step with attention_impl=pallas: the kernel lowers with Mosaic (not interpret mode)."""
    from jax._src import stages
    texts = []
    compile_original = stages.Lowered.compile
    monkeypatch.setattr(stages.Lowered, "compile",
                        lambda self, *args, **kwargs: texts.append(self.as_text()) or compile_original(self, *args,
                                                                                                          **kwargs))
    from vitjax import cli
    report = cli.cli("vitjax.aot", aot.define_flags, aot.run, [
        "--config=configs/vit_i1k.py:runlocal", "--topology=v5e:2x2", "--set=batch_size=16",
        "--set=model.attention_impl=pallas", "--json=" + str(tmp_path / "report.json")])
    text = capsys.readouterr().out
    assert "fits" in text and "MFU ceiling" in text and "all-gather" in text
    assert report["devices"] == 4 and report["fits"] and report["total_bytes"] < 1e9
    assert texts and "tpu_custom_call" in texts[-1]
    assert (tmp_path / "report.json").exists()


@needs_libtpu
@pytest.mark.parametrize("spec, extra_key", [("configs/sit_vit.py:runlocal", "image_1"),
                                             ("configs/clip_digits.py:runlocal", "text"),
                                             ("configs/deit_lt.py:runlocal", "train_step")])
def test_objectives_reading_more_than_image_and_label_compile_for_tpu(spec, extra_key):
    """SiT's second view, CLIP's token ids and DeiT-LT's train step come from the objective's example_batch."""
    from vitjax import train
    config = config_utils.load_config(spec, {})
    result = aot.compile_train_step(config, "v5e:2x2")
    assert result.compiled is not None and result.out_of_memory is None
    _, objective = train.build(config)
    assert sorted(result.setup.example_batch) == sorted(objective.batch_keys)
    assert extra_key in result.setup.example_batch


def _attention_operands(dtype, length, head_dim=64, bias=False):
    token = jax.ShapeDtypeStruct((2, length, 2, head_dim), jnp.dtype(dtype))
    return [token, token, token], (jax.ShapeDtypeStruct((1, 2, length, length), jnp.float32) if bias else None)


def test_dispatcher_refuses_on_tpu_what_mosaic_cannot_compile():
    from vitjax.kernels import common, dispatch, tome_merge
    (q, k, v), _ = _attention_operands("float16", 197)
    with common.target_platform("tpu", "TPU v5 lite"):
        assert "Invalid vector type" in dispatch.unsupported_reason("pallas", q, k, v)
        assert "bfloat16" in tome_merge.unsupported_reason(jax.ShapeDtypeStruct((2, 197, 64), jnp.float16), None)
        assert dispatch.choose_impl(q, k, v) == "xla"
    with common.target_platform(None):  # interpret mode on this CPU still runs fp16
        assert dispatch.unsupported_reason("pallas", q, k, v) is None
    # Streaming K/V tiles: the sequence length no longer decides the VMEM (80.2 MiB at N = 16384 with a bias
    # before); only block sizes whose tiles cannot fit are refused, with the estimate.
    (q, k, v), bias = _attention_operands("bfloat16", 16384, bias=True)
    with common.target_platform("tpu", "TPU v4"):
        assert dispatch.unsupported_reason("pallas", q, k, v, bias=bias) is None
        from vitjax.kernels import attention
        huge = attention.BlockSizes(block_q=4096, block_k=4096)
        reason = attention.unsupported_reason(q, k, v, bias=bias, block_sizes=huge)
        assert "MiB of VMEM, over the 13.6 MiB of TPU v4" in reason and "smaller block sizes" in reason


@needs_libtpu
def test_streamed_attention_compiles_at_16k_with_a_bias_within_its_vmem_estimate():
    """N = 16384 with a full bias (refused before: 80.2 MiB of VMEM) compiles for v4, the smallest VMEM, and
    the TPU compiler's own VMEM need lies within the dispatcher's estimate, at most 4x under it."""
    from vitjax.kernels import attention

    def loss(q, k, v, bias):
        return attention.flash_attention(q, k, v, bias=bias).astype(jnp.float32).sum()

    (q, k, v), bias = _attention_operands("bfloat16", 16384, bias=True)
    function = jax.grad(loss, argnums=(0, 1, 2, 3))
    result = aot.compile_on_chip(function, [q, k, v, bias], "v4:2x2x1")
    assert result["ok"], result["error"]
    estimate = attention.mosaic_vmem_bytes(16384, 16384, 64, jnp.bfloat16, bias=True, key_bias=False)
    needed = aot.mosaic_vmem_needed(function, [q, k, v, bias], "v5e:2x2", granule=64 * 2**10, high=2**20)
    assert needed is not None and estimate / 4 <= needed <= estimate, (needed, estimate)


@needs_libtpu
def test_pallas_attention_forward_and_backward_compile_for_tpu(monkeypatch):
    from vitjax.kernels import attention, common

    def loss(q, k, v, bias):
        return attention.flash_attention(q, k, v, bias=bias).astype(jnp.float32).sum()

    (q, k, v), bias = _attention_operands("bfloat16", 197, bias=True)
    for topology in ("v4:2x2x1", "v5e:2x2"):
        result = aot.compile_on_chip(jax.grad(loss, argnums=(0, 1, 2, 3)), [q, k, v, bias], topology)
        assert result["ok"], (topology, result["error"])
    # What the dispatcher refuses, and rightly: without the check the TPU compiler fails on it.
    monkeypatch.setattr(common, "dtype_unsupported_reason", lambda *args, **kwargs: None)
    (q, k, v), _ = _attention_operands("float16", 197)
    failed = aot.compile_on_chip(attention.flash_attention, [q, k, v], "v5e:2x2")
    assert not failed["ok"] and "Invalid vector type" in failed["error"]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the triton package (installed with torch on Linux) compiles for the GPU")


@needs_triton
def test_attention_kernels_compile_for_hopper_within_its_shared_memory():
    from vitjax.kernels import attention
    token = jax.ShapeDtypeStruct((2, 197, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        return attention.flash_attention(q, k, v).astype(jnp.float32).sum()

    function = jax.grad(loss, argnums=(0, 1, 2))
    kernels = aot.triton_kernels(function, [token] * 3)
    assert [kernel["name"] for kernel in kernels] == [
        "vitjax_attention_forward", "vitjax_attention_backward_dq", "vitjax_attention_backward_dkdv"]
    report = aot.compile_for_gpu(function, [token] * 3, capability=90)
    assert report["ok"], report["error"]
    for kernel in report["kernels"]:
        assert 0 < kernel["shared_bytes"] <= aot.GPU_SHARED_BYTES[90]
        assert 0 < kernel["registers"] <= aot.GPU_MAX_REGISTERS
        # The default tiles and warps keep ptxas from spilling (16 bytes in dK/dV; 2.6 KB with 4 warps).
        assert kernel["spill_bytes"] <= 64, kernel
