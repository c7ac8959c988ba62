"""NumPy MLP detector: the specification of the MLP family (the JAX port matches it).

Modules: ``layers`` (forward/backward pairs), ``model`` (init, forward, backward,
update), ``checkpoint`` (canonical safetensors), ``train`` and
``predict`` (entry points: ``python -m numpy_mlp.train`` / ``numpy_mlp.predict``).
"""
