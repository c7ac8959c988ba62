"""JAX port of the two specification stacks (numpy_mlp/ and torch_cnn/).

The same functions as the specs, jit-compiled: parity with them is the definition of
done (tests/test_parity_mlp.py, tests/test_parity_cnn.py). Public API (what bench/ uses):

- ``jax_port.model``: ``get_spec(name, hidden=None)`` -> ``ModelSpec``;
  ``init_variables(spec, seed, dtype)``; ``apply(spec, variables, x_float, train, mask,
  conv_impl)`` -> (logits (B,), new batch_stats); ``bce_with_logits``; ``FlaxModel`` (linen
  wrapper over ``apply``); ``default_conv_impl()``.
- ``jax_port.steps``: ``Trainer(spec, lr=, batch_size=, decay=, augment=, seed=, conv_impl=,
  dtype=, rng_epoch_offset=, schedule=, label_smoothing=, tta=, mesh=)`` with
  ``init_state(variables)``, ``train_step(state, x_u8, y, draws, mask, lr, ema_decay)`` (one
  compiled step), ``run_epoch(state, images_dev, labels_dev, epoch)`` (compiled ``lax.scan``
  chunks; returns (state, metrics)), ``final_variables(state)`` (the moving average when the
  recipe keeps one), ``logits(variables, images_u8)``; ``augment_device``. Several devices:
  ``mesh=make_mesh(devices)`` (data parallel over a ``jax.sharding`` Mesh), then
  ``put(host_array)`` / ``place(state)`` / ``eval_set(images)`` lay data out on it.
- ``jax_port.convert``: canonical (numpy_mlp / torch ``state_dict``) <-> JAX pytrees, lossless.
- ``jax_port.checkpoint``: ``save(path, spec, variables)`` / ``load(path, model=None)``.
- ``python -m jax_port.train`` / ``python -m jax_port.predict``.
"""
