r"""DSSN on COCO (81 classes, UniMatch's layout and splits).

    python main.py --config configs/coco.py:split=1_512,backbone=resnet101 \
        --workdir runs/coco_1_512 \
        --config.data.root=/data/coco --config.data.splits_dir=/data/splits/coco \
        --config.model.pretrained=pretrained/resnet101.pth

UniMatch V2 (DINOv2-B, published 47.9 mIoU at 1/512):

    python main.py --config configs/coco.py:split=1_512,backbone=dinov2_base,method=unimatch_v2 \
        --workdir runs/coco_1_512_uv2_b \
        --config.data.root=/data/coco --config.data.splits_dir=/data/splits/coco \
        --config.model.pretrained=pretrained/dinov2_base.pth

ARG (`k=v,...`; a bare value sets `split`):
  split     a folder name under splits_dir (UniMatch: 1_512 | 1_256 | 1_128 | 1_64 | 1_32)
  backbone  resnet101 | resnet50 | dinov2_small | dinov2_base | dinov2_large |
            dinov3_small | dinov3_small_plus | dinov3_base | dinov3_large |
            dinov3_huge_plus | dinov3_7b
  method    dssn | unimatch | fixmatch | supervised | unimatch_v2
  precision fp32 (the authors' float32) | bf16 (accelerator preset: bfloat16 compute,
            float32 parameters, norms, softmax and losses; docs/performance.md)

Recipe, DINOv2: UniMatch V2's `configs/coco.yaml` (crop 518, 20 epochs,
global batch 16 = 4 GPUs x 4 (`loss_groups=4`), AdamW 5e-6 / head 40x, CE, encoder trained,
whole-image evaluation resized to multiples of 14). ResNet: UniMatch's COCO
recipe (crop 513, 30 epochs, global batch 8 = 8 GPUs x 1 (`loss_groups=8`), lr 0.004 with the
head at 10x, whole-image evaluation) with DSSN's losses, CPLG and teacher.
DINOv3 (`dinov3_*`, new: no published number, no run here): the same recipe
with the crop at the nearest multiple of 16, 512, and the evaluation resized
to multiples of 16 (docs/backbones.md).

Departures from the papers (docs/faithfulness.md):
  - DSSN publishes no COCO run: the ResNet recipe is UniMatch's;
  - UniMatch's COCO numbers used Xception-65, which dssn_jax does not ship:
    expect numbers below theirs with ResNet-101.
"""

from dssn_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(
    arg, split='1_512', backbone='resnet101', method='dssn', precision='fp32'
  )
  c = config_lib.base_config()
  c.method = args['method']
  c.model.backbone = args['backbone']
  c.model.pretrained = f'pretrained/{args["backbone"]}.pth'
  c.data.name = 'coco'
  c.data.root = 'data/coco'
  c.data.splits_dir = 'splits/coco'
  c.data.split = args['split']
  c.data.num_classes = 81
  c.data.crop_size = 513
  c.data.batch_size = 8
  c.train.loss_groups = 8  # UniMatch's 8 GPUs x 1
  c.data.workers = -1  # auto: from the host's cores (data.pipeline.auto_workers)
  c.data.strong_ops = 3
  c.data.eval_mode = 'original'
  c.train.epochs = 30.0
  c.train.lr = 0.004
  c.train.lr_multi = 10.0
  c.train.log_every = 50
  c.train.checkpoint_every = 2000
  if config_lib.is_vit(args['backbone']):
    config_lib.dinov2_recipe(c, args['backbone'], crop=518, epochs=20, batch=16)
  return config_lib.apply_precision(c, args['precision'])
