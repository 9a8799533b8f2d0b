r"""DSSN and UniMatch V2 on PASCAL VOC 2012 (+SBD for the blended splits).

DSSN, ResNet-101 (published 75.2 mIoU with 92 labels):

    python main.py --config configs/pascal.py:split=92,backbone=resnet101 \
        --workdir runs/voc_92_r101 \
        --config.data.root=/data/VOC2012 --config.data.splits_dir=/data/splits/pascal \
        --config.model.pretrained=pretrained/resnet101.pth

UniMatch V2 (DINOv2-B, published 86.3 mIoU with 92 labels):

    python main.py --config configs/pascal.py:split=92,backbone=dinov2_base,method=unimatch_v2 \
        --workdir runs/voc_92_uv2_b \
        --config.data.root=/data/VOC2012 --config.data.splits_dir=/data/splits/pascal \
        --config.model.pretrained=pretrained/dinov2_base.pth

DSSN on DINOv2 (new; no published number): the same with `method=dssn`.
On one 24 GB GPU add `--config.train.grad_accum=4`: the authors' 4-GPU update
exactly (`loss_groups=4`, docs/performance.md).

ARG (`k=v,...`; a bare value sets `split`):
  split     92 | 183 | 366 | 732 | 1464 (classic) | 1_16 | 1_8 | 1_4 | 1_2 (blended)
  backbone  resnet101 (published) | resnet50 | dinov2_small | dinov2_base | dinov2_large |
            dinov3_small | dinov3_small_plus | dinov3_base | dinov3_large |
            dinov3_huge_plus | dinov3_7b
  method    dssn | unimatch | fixmatch | supervised | unimatch_v2
  precision fp32 (the authors' float32) | bf16 (accelerator preset: bfloat16 compute,
            float32 parameters, norms, softmax and losses; docs/performance.md)

Recipe, ResNet (DSSN's `pascal.yaml`): crop 513, 100 epochs, global batch
8 labeled + 8 unlabeled (4 GPUs x 2, `loss_groups=4`), SGD lr 0.002 with the head at 10x, CE,
EMA 0.996, CPLG 0.92/0.96, up to three random strong ops, whole-image
("original") evaluation; `pretrained` is the deep-stem ImageNet ResNet of
UniMatch/DSSN (`resnet101.pth`, read directly or converted:
docs/backbones.md). DINOv2 (UniMatch V2's `configs/pascal.yaml`,
`config_lib.dinov2_recipe`): crop 518, 60 epochs, global batch 16 (4 GPUs x
4, `loss_groups=4`), AdamW lr 5e-6 with the head at 40x, weight decay 0.01, CE, threshold
0.95, encoder trained, whole-image evaluation resized to multiples of 14.
DINOv3 (`dinov3_*`, new: no published number, no run here): the same recipe
with the crop at the nearest multiple of 16, 512, and the evaluation resized
to multiples of 16 (docs/backbones.md).

Departures from the authors' code: none of this config's own; the
framework's (each a flag with the code's behaviour as default) are in
docs/faithfulness.md.
"""

from dssn_jax import config_lib

SPLITS = ('92', '183', '366', '732', '1464', '1_16', '1_8', '1_4', '1_2')


def get_config(arg=None):
  args = config_lib.parse_arg(
    arg, split='92', backbone='resnet101', method='dssn', precision='fp32'
  )
  if args['split'] not in SPLITS:
    raise config_lib.ConfigError(
      f'pascal split {args["split"]!r} is not one of {", ".join(SPLITS)}'
    )
  c = config_lib.base_config()
  c.method = args['method']
  c.model.backbone = args['backbone']
  c.model.pretrained = f'pretrained/{args["backbone"]}.pth'
  c.data.name = 'pascal'
  c.data.root = 'data/VOC2012'
  c.data.splits_dir = 'splits/pascal'
  c.data.split = args['split']
  c.data.num_classes = 21
  c.data.crop_size = 513
  c.data.batch_size = 8
  c.train.loss_groups = 4  # the authors' 4 GPUs x 2: their per-GPU update
  c.data.workers = -1  # auto: from the host's cores (data.pipeline.auto_workers)
  c.data.strong_ops = 3
  c.data.eval_mode = 'original'
  c.train.epochs = 100.0
  c.train.lr = 0.002
  c.train.lr_multi = 10.0
  c.train.warmup_steps = 1
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  if config_lib.is_vit(args['backbone']):
    config_lib.dinov2_recipe(c, args['backbone'], crop=518, epochs=60, batch=16)
  return config_lib.apply_precision(c, args['precision'])
