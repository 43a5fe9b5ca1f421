"""AdaptFormer (Chen et al. 2022): a bottleneck adapter in parallel with every block's MLP.

    model = vitjax.models.create("vit_base_patch16_224", adapt=dict(method="adapter", bottleneck=64, scale=0.1))

As the official code (ShoufaChen/AdaptFormer, `Adapter` with ffn_option="parallel", no adapter LayerNorm, the
"lora" init, adapter_scalar 0.1, dropout 0.1): in each block, with x the residual stream after attention,

    x = x + drop_path(mlp(norm2(x))) + scale * up(dropout(relu(down(x))))

The branch takes the un-normalised stream and is not dropped by stochastic depth. Init: `down` kaiming-uniform
(U(+-1/sqrt(width)), torch's Linear default), `up` and both biases zero, so the model starts equal to the base.
Parameters: `blocks_<i>/adapter/down_proj`, `blocks_<i>/adapter/up_proj`.
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax

from vitjax.adapt.base import Method, register, torch_linear_uniform


class ParallelAdapter(nn.Module):
    """down-proj, ReLU, dropout, up-proj, times `scale`; returns the branch (same width as its input)."""
    bottleneck: int
    scale: float
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        hidden = nn.Dense(self.bottleneck, kernel_init=torch_linear_uniform, name="down_proj")(x)
        hidden = nn.Dropout(self.dropout)(nn.relu(hidden), deterministic=not train)
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="up_proj")(hidden) * self.scale


@register
@dataclasses.dataclass(frozen=True)
class Adapter(Method):
    """AdaptFormer's parallel adapter beside every MLP."""
    name = "adapter"
    param_patterns = (r"(^|/)adapter/",)

    bottleneck: int = 64
    scale: float = 0.1
    adapter_dropout: float = 0.1

    def validate(self) -> None:
        if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"adapt.bottleneck must be a positive int, got {self.bottleneck!r}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapt.adapter_dropout must be in [0, 1), got {self.adapter_dropout}")

    def mlp_branch(self, x: jax.Array, train: bool) -> Optional[jax.Array]:
        """Returns the adapter's branch of the residual stream `x`."""
        return ParallelAdapter(self.bottleneck, self.scale, self.adapter_dropout, name="adapter")(x, train)
