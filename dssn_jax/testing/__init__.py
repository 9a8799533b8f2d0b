"""Support shared by the tests and the benchmarks; imported by neither the
training nor the evaluation code.

- `fake_datasets`: small VOC / Cityscapes / COCO trees on disk, in each
  dataset's real layout, for the data-pipeline tests and benchmarks.
- `torch_reference`: a plain-PyTorch DeepLabV3+ (needs `torch`, the
  `convert` extra), the target of the weight-conversion parity tests and of
  `benchmarks/step_speed.py --torch`.
"""
