"""Data: dataset sources, augmentations and grain pipelines.

- `sources`: random-access records of each dataset layout and split.
- `transforms`: the augmentation ops of the training views.
- `pipeline`: `TrainData` (training batches) and `eval_records`.
- `normalize`: ImageNet normalization, applied on device.
- `python -m dssn_jax.data check --config ...`: validates a dataset.

Modules are imported explicitly (`from dssn_jax.data import pipeline`), so
importing this package stays cheap.
"""
