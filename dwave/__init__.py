"""dwave: a music archive in, a WaveNet that writes new songs out, at cluster scale.

Stages: ``preprocess`` (Dask) -> ``train`` (TensorFlow + Horovod) -> ``generate``.
"""

__version__ = "0.1.0"
