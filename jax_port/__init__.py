"""JAX port of the two specification stacks (numpy_mlp/ and torch_cnn/).

The same functions as the specs, jit-compiled: parity with them is the definition of
done (tests/parity/test_parity_mlp.py, tests/parity/test_parity_cnn.py). Public API (what bench/ uses):

- ``jax_port.model``: ``get_spec(name, hidden=None)`` -> ``ModelSpec``;
  ``init_variables(spec, seed, dtype)``; ``apply(spec, variables, x_float, train, mask,
  conv_impl)`` -> (logits (B,), new batch_stats); ``bce_with_logits``; ``FlaxModel`` (linen
  wrapper over ``apply``); ``default_conv_impl()``.
- ``jax_port.steps``: ``StepConfig.of(spec, conv_impl=, dtype=, augment=, ema=,
  label_smoothing=, tta=, mesh=)`` (what is compiled), ``TrainState`` and
  ``init_state(cfg, variables)``; the module-level jitted ``train_step(cfg, state, ...)``,
  ``train_chunk`` (a ``lax.scan`` of steps), ``full_batch_step`` and ``eval_logits``;
  ``logits(cfg, variables, images_u8)``; ``final_variables(state)`` (the moving average when
  the recipe keeps one); ``EpochRunner(cfg, batch_size=, seed=, lr= | schedule=, decay=,
  rng_epoch_offset=)`` with ``run_epoch(state, images_dev, labels_dev, epoch)`` (returns
  (state, metrics)), ``compile_epoch`` and ``step`` (one step on host data). Several
  devices: ``mesh=make_mesh(devices)`` (data parallel over a ``jax.sharding`` Mesh), then
  ``put(cfg, host_array)`` / ``place(cfg, state)`` / ``eval_set(cfg, images)``.
- ``jax_port.convert``: canonical (numpy_mlp / torch ``state_dict``) <-> JAX pytrees, lossless.
- ``jax_port.checkpoint``: ``save(path, spec, variables)`` / ``load(path, model=None)``.
- ``python -m jax_port.train`` / ``python -m jax_port.predict``.
"""

# The CNN's convolution formulations (jax_port.model.conv3x3), here so that a command can
# offer them without importing JAX.
CONV_IMPLS = ("hybrid", "im2col", "xla")
