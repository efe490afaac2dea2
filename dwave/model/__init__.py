"""The network and its files: the architecture (config), the Keras WaveNet, the output
distribution its last layer parameterises, the fused CPU kernels a training step uses, the
weights exported for generation, and the run directory that holds a model's config and
checkpoints (written by training, read by generation)."""
