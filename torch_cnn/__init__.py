"""PyTorch CNN stack: the specification of the CNN family.

Modules: ``model`` (the three networks), ``pipeline`` (torchvision and on-device
input pipelines), ``checkpoint`` (canonical safetensors), ``train`` and ``predict`` (entry points).
"""
