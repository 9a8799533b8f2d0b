r"""DSSN and UniMatch V2 on Cityscapes (fine annotations).

DSSN, ResNet-101 (published 76.7 mIoU at 1/16):

    python main.py --config configs/cityscapes.py:split=1_16,backbone=resnet101 \
        --workdir runs/city_1_16_r101 \
        --config.data.root=/data/cityscapes --config.data.splits_dir=/data/splits/cityscapes \
        --config.model.pretrained=pretrained/resnet101.pth

UniMatch V2 (DINOv2-B, published 83.6 mIoU at 1/16):

    python main.py --config configs/cityscapes.py:split=1_16,backbone=dinov2_base,method=unimatch_v2 \
        --workdir runs/city_1_16_uv2_b \
        --config.data.root=/data/cityscapes --config.data.splits_dir=/data/splits/cityscapes \
        --config.model.pretrained=pretrained/dinov2_base.pth

ARG (`k=v,...`; a bare value sets `split`):
  split     1_16 | 1_8 | 1_4 | 1_2 (labeled fraction)
  backbone  resnet101 (published, 1 image x 8 GPUs) | resnet50 (2 x 4 GPUs) |
            dinov2_small | dinov2_base | dinov2_large | dinov3_small |
            dinov3_small_plus | dinov3_base | dinov3_large | dinov3_huge_plus |
            dinov3_7b
  method    dssn | unimatch | fixmatch | supervised | unimatch_v2
  precision fp32 (the authors' float32) | bf16 (accelerator preset: bfloat16 compute,
            float32 parameters, norms, softmax and losses; docs/performance.md)

Recipe, DINOv2 (UniMatch V2's `configs/cityscapes.yaml`): crop 798, 180
epochs, global batch 8 (4 GPUs x 2, `loss_groups=4`), AdamW 5e-6 / head
40x, OHEM (thresh 0.7, min_kept 200000 per GPU batch), threshold 0.95,
encoder trained, sliding-window evaluation with 798 windows. DINOv3
(`dinov3_*`, new: no published number, no run here): the same recipe with
the crop at the nearest multiple of 16, 800 (50 x 50 patches; 800-pixel
windows; docs/backbones.md). DSSN's Cityscapes specifics (threshold 0, 5
warm-up epochs) stay with `method=dssn`.

Recipe, ResNet (DSSN's, differences from VOC): crop 801, 240 epochs,
lr 0.005 with lr_multi 1, global batch 8 (`loss_groups`: 8 GPUs x 1 for
R-101, 4 x 2 for R-50), OHEM for the supervised loss (thresh 0.7, min_kept
100000 per GPU batch), every pseudo-label mask is the fixed rule
`conf >= 0` (all valid pixels), no random strong ops, and during the first 5
epochs no strong-view terms and EMA keep rate 0. The total
`(L_x + 0.25*(L_s1+L_s2+L_fp1+L_fp2))/2 + 0.005*(L_img+L_feat)` has the same
effective weights as the defaults. Evaluation: sliding window (crop-sized
windows, stride 2/3 crop).

Departures from the authors' code: none of this config's own; the
framework's (each a flag with the code's behaviour as default) are in
docs/faithfulness.md.
"""

from dssn_jax import config_lib

SPLITS = ('1_16', '1_8', '1_4', '1_2')


def get_config(arg=None):
  args = config_lib.parse_arg(
    arg, split='1_16', backbone='resnet101', method='dssn', precision='fp32'
  )
  if args['split'] not in SPLITS:
    raise config_lib.ConfigError(
      f'cityscapes split {args["split"]!r} is not one of {", ".join(SPLITS)}'
    )
  c = config_lib.base_config()
  c.method = args['method']
  c.model.backbone = args['backbone']
  c.model.pretrained = f'pretrained/{args["backbone"]}.pth'
  c.data.name = 'cityscapes'
  c.data.root = 'data/cityscapes'
  c.data.splits_dir = 'splits/cityscapes'
  c.data.split = args['split']
  c.data.num_classes = 19
  c.data.crop_size = 801
  c.data.batch_size = 8
  # DSSN's GPUs: 8 x 1 image, 4 x 2; OHEM keeps min_kept per GPU.
  c.train.loss_groups = 8 if args['backbone'] == 'resnet101' else 4
  c.data.workers = -1  # auto: from the host's cores (data.pipeline.auto_workers)
  c.data.strong_ops = 0
  c.data.eval_mode = 'sliding_window'
  c.loss.sup_type = 'ohem'
  c.loss.ohem_thresh = 0.7
  c.loss.ohem_min_kept = 100000
  if args['method'] == 'dssn':
    c.loss.pseudo_label = 'fixed'
    c.loss.threshold = 0.0
  c.train.epochs = 240.0
  c.train.lr = 0.005
  c.train.lr_multi = 1.0
  c.train.warmup_epochs = 5.0
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  if config_lib.is_vit(args['backbone']):
    config_lib.dinov2_recipe(c, args['backbone'], crop=798, epochs=180, batch=8)
    c.data.eval_resize_multiple = 0  # sliding windows of 798 = 57 x 14
    c.loss.ohem_min_kept = 200000  # per GPU batch of 2 (loss_groups=4)
  return config_lib.apply_precision(c, args['precision'])
