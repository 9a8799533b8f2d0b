"""Support shared by the tests and the benchmarks; imported by neither the
training nor the evaluation code.

- `numerics`: the float32 comparison tolerances and `assert_close`.
- `configs`: the repository's `configs/*.py` loaded by name, the tiny
  override every config must accept, a run's metrics.
- `batches`: random train batches in the docs/design.md layout.
- `train_steps`: `resnet_tiny` train steps on random batches from one fixed
  init (the train-step tests, in process and in a subprocess).
- `evaluation`: toy models, records and workdirs for the evaluation and
  prediction tests (also run in subprocesses).
- `tapped_model`: a tiny segmenter with the tapped-feature contract of the
  DINOv2/DPT family, and its PyTorch rendering (`torch` only when asked).
- `fake_datasets`: small VOC / Cityscapes / COCO trees on disk, in each
  dataset's real layout, for the data-pipeline tests and benchmarks.
- `torch_reference`: a plain-PyTorch DeepLabV3+ (needs `torch`, the
  `convert` extra), the target of the weight-conversion parity tests and of
  `benchmarks/step_speed.py --torch`.
- `torch_dinov2_reference`: a plain-PyTorch DINOv2 + DPT (UniMatch V2's
  model; needs `torch`), the target of the DINOv2 parity tests and of
  `benchmarks/step_speed.py --method unimatch_v2 --torch`.
- `torch_dinov3_reference`: transformers' `DINOv3ViTModel` under that DPT
  head (needs `torch` and `transformers`), the target of the DINOv3 parity
  tests and the PyTorch side of the same benchmark on a `dinov3_*` backbone.
"""
