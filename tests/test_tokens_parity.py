"""Token reduction against the official code through the one interface: EViT (and its keep-rate warm-up).

The fixtures under tests/fixtures/<method>/ come from running the official repositories on a CPU with
re-randomised weights (see each README.md); the official code is not in this repository.
"""
import os

import jax
import numpy as np
import pytest

from vitjax import models
from vitjax.convert import vit as convert_vit
from vitjax.tokens import evit, mctf

from parity_utils import relative_error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EVIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_dim=128, num_classes=5)
EVIT_CASES = {"fuse": dict(keep_rate=(1, 0.7, 0.5, 1), fuse_token=True),
              "drop": dict(keep_rate=(1, 0.6, 1, 0.5), fuse_token=False)}


def load(method):
    data = np.load(os.path.join(FIXTURES, method, f"{method}.npz"))
    state = {key[len("state/"):]: data[key] for key in data.files if key.startswith("state/")}
    return data, state


@pytest.fixture(scope="module")
def evit_fixture():
    return load("evit")


@pytest.mark.parametrize("case, attention_impl", [("fuse", "xla"), ("fuse", "pallas"), ("drop", "xla")])
def test_evit_equals_official(evit_fixture, case, attention_impl):
    data, state = evit_fixture
    model = models.create("deit_tiny_patch16_224", attention_impl=attention_impl,
                          token_reduction=dict(method="evit", **EVIT_CASES[case]), **EVIT)
    variables = convert_vit.convert_timm(state, model)
    logits, intermediates = jax.jit(model.apply)(variables, data["images"])
    kept = intermediates["evit"]["kept_index"]
    reference_kept = [data[f"{case}/idx{i}"] for i in range(2)]
    assert len(kept) == 2
    for ours, reference in zip(kept.values(), reference_kept):
        np.testing.assert_array_equal(np.asarray(ours), reference)
    error = relative_error(logits, data[f"{case}/logits"])
    print(f"evit {case} {attention_impl}: relative error {error:.2e} "
          f"(official fp32 vs fp64: {relative_error(data[f'{case}/logits'], data[f'{case}/logits64']):.2e})")
    assert error <= 1e-5


def test_evit_keep_rate_warmup_is_the_official_schedule(evit_fixture):
    data, _ = evit_fixture
    ours = [evit.adjust_keep_rate(int(it), int(epoch), warmup_epochs=10, total_epochs=30, iters_per_epoch=10,
                                  base_keep_rate=0.7) for it, epoch in data["schedule/steps"]]
    np.testing.assert_allclose(ours, data["schedule/keep_rate"], rtol=1e-12)
    assert ours[0] == 1.0 and ours[-1] == pytest.approx(0.7)


ATS = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_dim=128, num_classes=5)


@pytest.mark.parametrize("attention_impl", ["xla", "pallas"])
def test_ats_equals_official(attention_impl):
    """The official drop_tokens=False path: fixed shapes, zero padding, the policy as our mask."""
    data, state = load("ats")
    model = models.create("deit_tiny_patch16_224", attention_impl=attention_impl,
                          token_reduction=dict(method="ats", ats_blocks=[1, 2]), **ATS)
    variables = convert_vit.convert_timm(state, model)
    logits, intermediates = jax.jit(model.apply)(variables, data["images"])
    masks = intermediates["ats"]["masks"]
    for index, block in enumerate((1, 2)):
        np.testing.assert_array_equal(np.asarray(masks[block]), data[f"drop_tokens0/policy{index}"])
    kept = [np.asarray(count).tolist() for count in intermediates["ats"]["kept"]]
    assert kept[0] == [65, 65] and kept[1][0] < 65 and kept[2][0] < kept[1][0], kept  # per-image counts
    error = relative_error(logits, data["drop_tokens0/logits"])
    print(f"ats {attention_impl}: relative error {error:.2e} (official fp32 vs fp64: "
          f"{relative_error(data['drop_tokens0/logits'], data['drop_tokens0/logits64']):.2e})")
    assert error <= 1e-5


MCTF = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_dim=128, num_classes=5)
# The fixture's cases: the official mctf_type list by its info names, and activate_layer.
MCTF_CASES = {
    "default": dict(r_student=0.35, activate_layer=(1, 2)),
    "plain": dict(r_student=6, one_step_ahead=0, bidirection=0, pooling_type=0, activate_layer=(0, 2, 3)),
    "precise_max": dict(r_student=0.3, prop_attn=0, one_step_ahead=2, tau_sim=2, tau_info=10, tau_size=0,
                        pooling_type=2, activate_layer=(1, 3)),
    "mean_ahead": dict(r_student=7, tau_info=0, bidirection=0, pooling_type=3, activate_layer=(0, 1, 2)),
}


@pytest.fixture(scope="module")
def mctf_fixture():
    return load("mctf")


@pytest.mark.parametrize("case", sorted(MCTF_CASES))
def test_mctf_equals_official(mctf_fixture, case):
    data, state = mctf_fixture
    model = models.create("deit_tiny_patch16_224", token_reduction=dict(method="mctf", **MCTF_CASES[case]), **MCTF)
    variables = convert_vit.convert_timm(state, model)
    logits, intermediates = jax.jit(model.apply)(variables, data["images"])
    assert list(intermediates["mctf"]["token_counts"]) == list(data[f"{case}/counts"])
    np.testing.assert_allclose(np.asarray(intermediates["mctf"]["sizes"][-1]), data[f"{case}/size"], rtol=1e-6)
    error = relative_error(logits, data[f"{case}/logits"])
    print(f"mctf {case}: relative error {error:.2e} (official fp32 vs fp64: "
          f"{relative_error(data[f'{case}/logits'], data[f'{case}/logits64']):.2e})")
    assert error <= 1e-5


def test_mctf_consistency_loss_equals_official(mctf_fixture):
    """Training mode: a student at r_student and a teacher at the drawn r_teacher, both with the same weights."""
    data, state = mctf_fixture
    encoded, logits = {}, {}
    r_teacher = float(data["consistency/r_teacher"])
    for role, r in (("student", 0.35), ("teacher", r_teacher)):
        model = models.create("deit_tiny_patch16_224", token_reduction=dict(
            method="mctf", r_student=r, activate_layer=(1, 2)), **MCTF)
        variables = convert_vit.convert_timm(state, model)
        logits[role], intermediates = jax.jit(lambda v, x, m=model: m.apply(v, x, train=True))(
            variables, data["images"])
        encoded[role] = intermediates["encoded"]
        assert relative_error(logits[role], data[f"consistency/{role}_logits"]) <= 1e-5
    loss = mctf.consistency_loss(encoded["student"], encoded["teacher"])
    error = relative_error(loss, data["consistency/loss"])
    print(f"mctf consistency loss: relative error {error:.2e}")
    assert error <= 1e-5 and float(np.min(loss)) > 0
    assert mctf.draw_r_teacher(np.random.default_rng(0), 0.15) in [k / 100 for k in range(15)]


TOME = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_dim=128, num_classes=5)


@pytest.mark.parametrize("case, r", [("constant", 6), ("schedule", (8, -0.5))])
def test_tome_equals_official(case, r):
    """ToMe through the interface (token_reduction=dict(method="tome")) against the official patch of timm."""
    data, state = load("tome")
    model = models.create("deit_tiny_patch16_224", token_reduction=dict(method="tome", r=r, trace_source=True),
                          **TOME)
    variables = convert_vit.convert_timm(state, model)
    logits, intermediates = jax.jit(model.apply)(variables, data["images"])
    np.testing.assert_array_equal(np.asarray(intermediates["tome"]["size"]), data[f"{case}/size"])
    np.testing.assert_array_equal(np.asarray(intermediates["tome"]["sources"][-1]), data[f"{case}/source"])
    error = relative_error(logits, data[f"{case}/logits"])
    print(f"tome {case}: relative error {error:.2e} (official fp32 vs fp64: "
          f"{relative_error(data[f'{case}/logits'], data[f'{case}/logits64']):.2e})")
    assert error <= 1e-5
