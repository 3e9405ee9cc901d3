"""Models: resolving a source (hub id, directory, GGUF, config), loading it whole or on the meta device,
finding its residual blocks, seeded random init, memory planning and placement.

``checkpoints/`` reads weights a few tensors at a time (safetensors, GGUF, Hub shards) behind one protocol.
"""
