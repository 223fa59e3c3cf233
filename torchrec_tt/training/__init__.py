"""Training utilities for the DLRM example (``examples/train_dlrm.py``).

* :mod:`torchrec_tt.training.config`: dataclass configuration, YAML and CLI overrides.
* :mod:`torchrec_tt.training.data`: synthetic Criteo-like data, Criteo files, MovieLens-100k.
* :mod:`torchrec_tt.training.model`: tables (TT or not), DLRM / DLRM-DCN, sharding, optimizers.
* :mod:`torchrec_tt.training.trainer`: the distributed train / eval loop, metrics, checkpoints.
"""
