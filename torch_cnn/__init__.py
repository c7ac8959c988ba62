"""PyTorch CNN stack: the specification of the CNN family (GitHub issue 4).

Modules: ``model`` (the three networks), ``pipeline`` (torchvision and on-device
input pipelines), ``presets`` (the original project's three rows),
``checkpoint`` (canonical safetensors), ``train`` and ``predict`` (entry points).
"""
