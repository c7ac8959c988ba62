"""JAX port of the two specification stacks (numpy_mlp/ and torch_cnn/).

The same functions as the specs, jit-compiled: parity with them is the
definition of done (tests/test_parity_*.py). Public API (also what bench/ uses):

- ``jax_port.model``: ``init_variables(model, seed, hidden=None)``, ``apply(model, variables,
  x_u8_or_float, train, dropout_mask=None, conv_impl=...)``, ``MODELS``, ``Flax`` wrappers.
- ``jax_port.steps``: ``Trainer(model, cfg)`` with ``init_state``, ``train_step``,
  ``run_epoch`` (one compiled ``lax.scan`` per epoch), ``evaluate``.
- ``jax_port.convert``: canonical (numpy_mlp / torch ``state_dict``) <-> JAX pytrees.
- ``jax_port.checkpoint``: ``save`` / ``load`` of ``model.safetensors`` under canonical names.
"""
