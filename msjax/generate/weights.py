"""The rollout engine's own copy of the weights, in the decode layout.

Decoding on the training parameters (every matrix split over `fsdp`) makes each chip gather the
whole model on every generated token: the TPU compiler keeps those gathers inside the decode
loop. `DecodeWeights` keeps a copy laid out by `msjax.sharding.DECODE_RULES` instead:
tensor-parallel over `tensor`, replicated over data and fsdp, in the decode dtype. It is refreshed
from the training parameters before each rollout by ONE jitted transfer whose outputs reuse the
previous copy's (donated) buffers.

    weights = DecodeWeights(abstract_state, mesh)    # abstract_model(cfg, mesh)[1]
    decode_params = weights.refresh(train_params)    # before every rollout
    sampler(decode_params, prompts, n=8, key=key)

The copy stays on the devices beside the training state (msjax-aot counts it). The backbone's
matrices and biases are cast to the decode dtype; the norm scales (applied in float32) and the
SPRM head (2C^2 parameters, read only at step delimiters) keep the training dtype. The model casts
matrices and biases to its compute dtype anyway, so with a bf16 compute dtype (the shipped
recipes) a bf16 copy computes exactly what the training parameters compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msjax import sharding as sh
from msjax.models.config import DTYPES

_CAST = "backbone"  # the subtree cast to the decode dtype, but for its norm scales


def decode_dtype(name: str | None, train_dtype, platform: str):
    """The decode copy's dtype: `name` ("float32" / "bfloat16"), or when empty bf16 on
    accelerators and the training dtype on CPU."""
    if name:
        if name not in DTYPES:
            raise ValueError(
                f"config.rollout.decode_dtype={name!r}; choose one of {sorted(DTYPES)} or '' "
                "(bfloat16 on accelerators, the training dtype on CPU)."
            )
        return DTYPES[name]
    return jnp.dtype(train_dtype) if platform == "cpu" else jnp.bfloat16


class DecodeWeights:
    """A decode-layout copy of a ReflectiveModel's parameters (see module doc).

    Args:
      abstract_params: the model's nnx.State whose Params carry `axes` metadata (values may be
        abstract), e.g. `abstract_model(cfg, mesh)[1]`.
      mesh: the (data, fsdp, tensor) mesh, or None (one device: only the dtype changes).
      dtype: "float32", "bfloat16", or None / "" for the default of `decode_dtype`.
    Attributes: `shardings` (pure dict of NamedSharding, None without a mesh), `dtype`,
    `abstract` (pure dict of jax.ShapeDtypeStruct of the copy, for AOT compilation).
    """

    def __init__(self, abstract_params: nnx.State, mesh=None, dtype: str | None = None):
        pure = nnx.to_pure_dict(abstract_params)
        train_dtype = jax.tree.leaves(pure[_CAST])[0].dtype
        keep_norm = lambda v: "norm" not in (v.get_metadata().get("axes") or ())
        self._cast = nnx.to_pure_dict(
            jax.tree.map(
                keep_norm, abstract_params[_CAST], is_leaf=lambda x: isinstance(x, nnx.Variable)
            )
        )
        platform = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform
        self.dtype = decode_dtype(dtype, train_dtype, platform)
        self.mesh = mesh
        self.shardings = None
        if mesh is not None:
            sh.check_divisible(abstract_params, mesh, sh.DECODE_RULES)
            specs = sh.state_shardings(abstract_params, mesh, sh.DECODE_RULES)
            self.shardings = nnx.to_pure_dict(specs)
        shapes = jax.eval_shape(self._convert, pure)
        self.abstract = (
            shapes
            if mesh is None
            else jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                shapes,
                self.shardings,
            )
        )
        self._first = jax.jit(self._convert, out_shardings=self.shardings)
        self._again = jax.jit(
            lambda previous, params: self._convert(params),
            out_shardings=self.shardings,
            donate_argnums=0,
            keep_unused=True,  # an unused argument would be pruned, and not donated
        )
        self._copy = None

    def _convert(self, params: dict) -> dict:
        """A real copy (never the input buffers: the train step donates those), the backbone
        but its norm scales cast to the decode dtype."""

        def copy(x, cast):
            x = jnp.copy(x)
            return x.astype(self.dtype) if cast and jnp.issubdtype(x.dtype, jnp.floating) else x

        return {
            k: jax.tree.map(copy, v, self._cast)
            if k == _CAST
            else jax.tree.map(lambda x: copy(x, False), v)
            for k, v in params.items()
        }

    def refresh(self, params) -> dict:
        """The decode copy of `params` (the training pure dict or nnx.State), in one jitted
        transfer. The copy returned by the previous call is donated (its buffers hold the new
        copy) and must not be used afterwards."""
        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
        if self._copy is None:
            self._copy = self._first(params)
        else:
            self._copy = self._again(self._copy, params)
        return self._copy
