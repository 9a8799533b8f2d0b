"""Support shared by the tests and the benchmarks; imported by neither the
training nor the evaluation code.

- `fake_datasets`: small VOC / Cityscapes / COCO trees on disk, in each
  dataset's real layout, for the data-pipeline tests and benchmarks.
- `torch_reference`: a plain-PyTorch DeepLabV3+ (needs `torch`, the
  `convert` extra), the target of the weight-conversion parity tests and of
  `benchmarks/step_speed.py --torch`.
- `torch_dinov2_reference`: a plain-PyTorch DINOv2 + DPT (UniMatch V2's
  model; needs `torch`), the target of the DINOv2 parity tests and of
  `benchmarks/step_speed.py --method unimatch_v2 --torch`.
"""
