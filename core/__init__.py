"""What the three stacks share besides pixels: model names and presets (``catalog``), the
architecture and its canonical tensor tables (``architecture``), initial weights
(``init``), learning-rate schedules (``recipe``), safetensors I/O (``tensors``), metrics,
the run driver (``driver``: flags, config, resume, lock, atomic writes) and the
``Detector`` base with the predict command (``predict``).

Import rule: data <- core <- numpy_mlp | torch_cnn | jax_port <- bench, cifake. This
package imports ``data`` and nothing else of the project.
"""
