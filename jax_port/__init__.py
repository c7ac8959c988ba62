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

# XLA:CPU hands each ``lax.conv`` and each dot to YNNPACK, which runs the v3 step's
# convolutions and the small MLP's products on one thread: on a 2-core machine the second
# core then idles through much of the step. Without that route XLA runs them with its own
# multi-threaded (Eigen) kernels, measured on the project's 2-core CPU at 1.2-1.3x for the
# v3 training step and ~1.2x for the mini-batch MLP epoch, full-batch epochs unchanged
# (docs/bench.md, "Where the CPU step's time goes"). XLA reads XLA_FLAGS once, when JAX
# starts its CPU backend: the flag is added here, at import, unless the user's XLA_FLAGS
# already choose YNNPACK's fusions. Same function, other rounding (parity tests).
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution"


def _prefer_threaded_kernels() -> None:
    import os
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()


_prefer_threaded_kernels()
