r"""DSSN on DigitScenes, the embedded dataset: the README's first command.

    python main.py --config configs/digits.py --workdir runs/digits

Runs on a laptop CPU in minutes, no download: scenes are composed on the fly
from the handwritten digits scikit-learn ships (`dssn_jax/data/digits.py`).
11 classes (background + digits 0-9), long-tailed; 100 labeled scenes (1% of
the 10,000 unlabeled ones), 300 validation scenes drawn from digit samples
the training scenes never use.

ARG (`k=v,...`; a bare value sets `method`):
  method    dssn | unimatch | fixmatch | supervised | unimatch_v2 (on this ResNet
            model without its complementary dropout: add --config.model.comp_drop=False)
  labeled   number of labeled scenes (default 100)
  precision fp32 (the authors' float32) | bf16 (accelerator preset: bfloat16 compute,
            float32 parameters, norms, softmax and losses; docs/performance.md)

The DSSN recipe with the spec's constants (CPLG 0.92/0.96, loss weights,
channel dropout 0.5, cutmix p 0.5, random strong ops), except what a
from-scratch model on a laptop CPU needs (measurements: docs/digits.md):
  - `resnet_tiny` at 1.5x width, no pretrained weights: none exist for it;
  - output stride 8 (the reference: 16): at crop 48 stride 16 leaves the
    head a 3x3 map; on a 6x6 one DSSN gains more over supervised training;
  - 72x72 scenes, crop 48, batch 8 + 8: a step 2x cheaper than at 96x96, crop 64;
  - AdamW 0.003, head at 1x: SGD from scratch stalls at half the mIoU;
  - no flip: a mirrored digit is not a digit;
  - no rescale: the scenes already vary the digits' size 2.4x;
  - warm-up: the first 1,000 of the 3,500 steps run the supervised
    iteration (`train.warmup_terms='supervised'`): a from-scratch teacher
    knows no digit at first, and those steps cost a fifth of a DSSN step;
  - `train.labeled_bn='separate'`, `strong_view_bn_stats=False`,
    `model.fp_bn='clean'`: the reference's joint BatchNorm cost the labeled
    learning ~5 points here;
  - teacher on running BN statistics, EMA 0.99: it labels with the
    statistics it is evaluated with, and keeps up in a short run;
  - `tail=0.8`, `data_seed=0`, 0-2 clutter items: every digit occurs among
    the 100 labeled scenes;
  - an independently shuffled cutmix partner: what every measurement used;
  - 3,500 steps, evaluated every 500 (the supervised model plateaus by
    2,500; DSSN's teacher keeps rising): with the supervised branch below,
    the README command takes about 10 minutes on 2 cores, install included.
After the 3,500 steps the supervised iteration continues from the warm-up's
state (step 1,000) on the same labeled batches to step 3,500, in
DIR/supervised (`train.supervised_branch`, about 2 minutes): the last lines
compare the teacher with it, and with the supervised baseline of the seed
study (`config.baseline`: its mIoU and its per-class IoU).
"""

from dssn_jax import config_lib, methods


def get_config(arg=None):
  args = config_lib.parse_arg(arg, method='dssn', labeled=100, precision='fp32')
  c = config_lib.base_config()
  c.method = args['method']
  c.model.backbone = 'resnet_tiny'
  c.model.width_multiplier = 1.5
  c.model.output_stride = 8
  c.model.pretrained = ''
  c.data.name = 'digits'
  c.data.num_classes = 11
  c.data.crop_size = 48
  c.data.batch_size = 8
  c.data.workers = 0
  c.data.strong_ops = 3
  c.data.scale_range = (1.0, 1.0)
  c.data.hflip = False
  c.data.eval_mode = 'original'
  # The measurements of docs/digits.md use an independently shuffled partner.
  if c.method != 'unimatch_v2':  # which pairs the batch reversed, no partner
    c.data.mix_partner = 'shuffled'
  c.data.digits.image_size = 72
  c.data.digits.num_labeled = args['labeled']
  c.data.digits.num_unlabeled = 10000
  c.data.digits.num_val = 300
  c.data.digits.tail = 0.8
  c.data.digits.data_seed = 0
  c.data.digits.clutter = (0, 2)
  c.train.steps = 3500
  c.train.optimizer = 'adamw'
  c.train.lr = 0.003
  c.train.lr_multi = 1.0
  c.train.warmup_steps = 1000
  c.train.warmup_terms = 'supervised'
  c.train.labeled_bn = 'separate'
  c.train.strong_view_bn_stats = False
  c.model.fp_bn = 'clean'
  c.train.teacher_bn = 'running'
  c.train.ema_decay = 0.99
  # Supervised from the warm-up's end on the same labeled batches: the live
  # baseline of the last lines and of DIR/predictions.png's supervised column.
  c.train.supervised_branch = methods.get(c.method).unlabeled
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  # Printed after the run: supervised on the same labels, 3,500 steps,
  # seeds 0-5, best student mIoU, jax 0.12.0.1 (docs/digits.md).
  if methods.get(c.method).unlabeled and args['labeled'] == 100:
    c.baseline.miou, c.baseline.std, c.baseline.seeds, c.baseline.steps = 22.51, 1.51, 6, 3500
    c.baseline.what = 'supervised on the same 100 labeled scenes'
    c.baseline.command = 'python benchmarks/semi_vs_supervised.py --seeds 0,1,2,3,4,5'
    # Its per-class IoU (background, digits 0-9), printed beside the run's.
    c.baseline.iou_per_class = (94.9, 11.8, 3.3, 33.7, 4.2, 21.0, 1.0, 17.7, 26.0, 22.8, 11.3)
  return config_lib.apply_precision(c, args['precision'])
