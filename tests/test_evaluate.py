"""Evaluation: confusion-matrix mIoU, the three modes, the Evaluator."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax import config_lib, evaluate, loading, state_dicts
from dssn_jax.compilation import CompileCounter
from dssn_jax.data import datasets
from dssn_jax.testing.evaluation import (
  NAMES3,
  PER_IMAGE_MEAN,
  TOY,
  TOY_CM,
  TOY_IOU,
  TOY_MIOU,
  DecodeModel,
  TinySeg,
  make_workdir,
  numpy_confusion,
  random_records,
  run_module,
  shift_vars,
  tiny_variables,
  toy_config,
  toy_records,
)

# ----------------------------------------------------------------------------


def test_confusion_matrix_inside_jit():
  cm = jax.jit(evaluate.confusion_matrix, static_argnums=(2,))(
    jnp.asarray(TOY[0]['pred']), jnp.asarray(TOY[0]['label']), 3
  )
  assert cm.dtype == jnp.int32
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [0, 0, 1]])


def test_hand_computed_miou_is_over_the_whole_set():
  cm = sum(
    np.asarray(evaluate.confusion_matrix(jnp.asarray(t['pred']), jnp.asarray(t['label']), 3))
    for t in TOY
  )
  np.testing.assert_array_equal(cm, TOY_CM)
  miou, iou = evaluate.iou_from_confusion(cm)
  # IoU: float64 arithmetic on exact integer counts, so float64 rounding only.
  np.testing.assert_allclose(iou, TOY_IOU, rtol=1e-9)
  assert miou == pytest.approx(TOY_MIOU, rel=1e-9)
  assert miou == pytest.approx(58.888889, abs=1e-5)
  # Averaging per image gives another number.
  per_image = np.mean(
    [
      evaluate.iou_from_confusion(
        evaluate.confusion_matrix(jnp.asarray(t['pred']), jnp.asarray(t['label']), 3)
      )[0]
      for t in TOY
    ]
  )
  assert per_image == pytest.approx(PER_IMAGE_MEAN, rel=1e-9)  # float64 from counts
  assert abs(per_image - miou) > 10


def test_absent_class_counts_as_zero_like_the_reference():
  cm = np.array([[5, 0, 0], [1, 4, 0], [0, 0, 0]])
  miou, iou = evaluate.iou_from_confusion(cm)
  np.testing.assert_allclose(iou, [5 / 6 * 100, 80.0, 0.0])  # float64 from counts
  assert miou == pytest.approx((5 / 6 + 0.8) / 3 * 100)


def test_evaluator_gives_the_hand_computed_miou():
  model = DecodeModel()
  ev = evaluate.Evaluator(model, toy_config(), records=toy_records(), class_names=NAMES3)
  out = ev.evaluate({'student': shift_vars(0), 'teacher': shift_vars(1)})
  assert model.traces == 3  # one program per image shape, shared by both models
  # Exact integer counts (the predictions are argmaxes far from ties), then float64.
  assert out['miou'] == pytest.approx(TOY_MIOU, rel=1e-9)
  assert list(out['iou_per_class']) == list(NAMES3)
  np.testing.assert_allclose(list(out['iou_per_class'].values()), TOY_IOU, rtol=1e-9)
  # The teacher predicts (class + 1) mod 3 everywhere.
  cm_t = sum(
    numpy_confusion((np.asarray(t['pred']) + 1) % 3, np.asarray(t['label']), 3) for t in TOY
  )
  assert out['miou_teacher'] == pytest.approx(evaluate.iou_from_confusion(cm_t)[0])
  assert set(out) == {'miou', 'iou_per_class', 'miou_teacher', 'iou_per_class_teacher'}
  # One model given: only its keys.
  only_teacher = ev.evaluate({'teacher': shift_vars(0)})
  assert set(only_teacher) == {'miou_teacher', 'iou_per_class_teacher'}
  assert only_teacher['miou_teacher'] == pytest.approx(TOY_MIOU, rel=1e-9)
  assert model.traces == 3  # nothing recompiled


def test_device_counts_move_to_host_before_int32_overflow():
  ev = evaluate.Evaluator(DecodeModel(), toy_config(), records=toy_records(), class_names=NAMES3)
  ev._flush_pixels = 5  # every batch forces a move of the counts to the host
  cms = ev.confusion_matrices({'student': shift_vars(0)})
  assert cms['student'].dtype == np.int64
  np.testing.assert_array_equal(cms['student'], TOY_CM)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match='eval_mode'):
    evaluate.Evaluator(DecodeModel(), toy_config(mode='tiles'), records=[])
  ev = evaluate.Evaluator(
    DecodeModel(),
    toy_config(),
    class_names=NAMES3,
    records=[
      {'image': np.zeros((4, 4, 3), np.uint8), 'label': np.zeros((4, 5), np.int32), 'id': 'img_7'}
    ],
  )
  with pytest.raises(ValueError, match='img_7'):
    ev.evaluate({'student': shift_vars(0)})
  with pytest.raises(ValueError, match='student'):
    ev.evaluate({'ema': shift_vars(0)})
  ev = evaluate.Evaluator(DecodeModel(), toy_config(), class_names=('a', 'b'), records=[])
  with pytest.raises(ValueError, match='num_classes=3'):
    ev.evaluate({'student': shift_vars(0)})


# ----------------------------------------------------------------------------
# Sliding windows.


def test_window_starts_follow_the_reference():
  assert evaluate.sliding_window_stride(801) == 534  # Cityscapes
  assert evaluate.sliding_window_stride(513) == 342
  assert evaluate.window_starts(1024, 534) == [0, 534]
  assert evaluate.window_starts(2048, 534) == [0, 534, 1068, 1602]
  assert evaluate.window_starts(5, 6) == [0]
  with pytest.raises(ValueError, match='too small'):
    evaluate.sliding_window_stride(1)


def positional_logits(x):
  """Logits that depend on the position inside the window and on the pixel."""
  n, h, w = x.shape[:3]
  i = jnp.arange(h, dtype=jnp.float32)[:, None, None]
  j = jnp.arange(w, dtype=jnp.float32)[None, :, None]
  c = jnp.arange(4, dtype=jnp.float32)[None, None, :]
  base = jnp.sin(0.7 * i + 1.3 * c) + jnp.cos(0.4 * j * (c + 1)) + 0.1 * h - 0.05 * w * c
  return base[None] + x[..., :1].astype(jnp.float32) * (c - 1.5) / 50.0


def reference_sliding(x, grid):
  """The reference loop, in numpy: truncated windows, softmax summed."""
  b, h, w = x.shape[:3]
  final = np.zeros((b, h, w, 4))
  row = 0
  while row < h:
    col = 0
    while col < w:
      crop = x[:, row : min(h, row + grid), col : min(w, col + grid)]
      logits = np.asarray(positional_logits(jnp.asarray(crop)), np.float64)
      e = np.exp(logits - logits.max(-1, keepdims=True))
      final[:, row : min(h, row + grid), col : min(w, col + grid)] += e / e.sum(-1, keepdims=True)
      col += int(grid * 2 / 3)
    row += int(grid * 2 / 3)
  return final


@pytest.mark.parametrize(
  'shape,grid',
  [
    ((23, 31), 9),  # several windows, truncated at the right and bottom
    ((5, 7), 9),  # smaller than the window: still two truncated windows
    ((9, 9), 9),  # exactly the window: a full and a truncated one
  ],
)
def test_sliding_window_matches_the_reference_loop(shape, grid):
  x = np.random.default_rng(0).integers(0, 256, (2,) + shape + (3,), dtype=np.uint8)
  got = jax.jit(lambda im: evaluate.sliding_window_probs(positional_logits, im, grid))(x)
  want = reference_sliding(x, grid)
  # float32 probabilities (scale 1) averaged over a few windows vs float64:
  # a few eps of the scale, and the argmax must agree exactly.
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(np.asarray(got), -1), np.argmax(want, -1))
  assert got.shape == (2,) + shape + (4,)


# ----------------------------------------------------------------------------
# End to end with a small random network.


def direct_confusion(model, variables, records, mode, window, c=3):
  """Image by image, outside the Evaluator."""
  logits_fn = evaluate.model_logits_fn(model, variables)
  if mode == 'sliding_window':
    scores_fn = jax.jit(lambda im: evaluate.sliding_window_probs(logits_fn, im, window))
  else:
    scores_fn = jax.jit(logits_fn)
  total = np.zeros((c, c), np.int64)
  for r in records:
    image, label = r['image'], r['label']
    if mode == 'center_crop':
      image, label = evaluate.center_crop(image, label, window)
    scores = scores_fn(jnp.asarray(image[None]))
    total += numpy_confusion(np.asarray(jnp.argmax(scores, -1))[0], label, c)
  return total


@pytest.mark.parametrize('mode', evaluate.MODES)
def test_evaluator_end_to_end_each_mode(mode):
  model = TinySeg()
  student, teacher = tiny_variables(model, 1), tiny_variables(model, 5)
  records = random_records([(13, 17), (12, 12), (13, 17)], seed=3)
  ev = evaluate.Evaluator(
    model, toy_config(mode=mode, crop=10), records=records, class_names=NAMES3
  )
  cms = ev.confusion_matrices({'student': student, 'teacher': teacher})
  np.testing.assert_array_equal(cms['student'], direct_confusion(model, student, records, mode, 10))
  pixels = sum(
    int((evaluate.center_crop(r['image'], r['label'], 10)[1] != 255).sum())
    if mode == 'center_crop'
    else int((r['label'] != 255).sum())
    for r in records
  )
  assert cms['student'].sum() == pixels == cms['teacher'].sum()
  out = ev.evaluate({'student': student, 'teacher': teacher})
  assert 0.0 <= out['miou'] <= 100.0 and 0.0 <= out['miou_teacher'] <= 100.0
  assert out['miou'] != out['miou_teacher']


def test_center_crop_cuts_like_the_reference():
  image = np.arange(7 * 10 * 3, dtype=np.uint8).reshape(7, 10, 3)
  label = np.arange(70, dtype=np.int32).reshape(7, 10)
  im, lb = evaluate.center_crop(image, label, 5)
  np.testing.assert_array_equal(lb, label[1:6, 2:7])
  np.testing.assert_array_equal(im, image[1:6, 2:7])
  im, lb = evaluate.center_crop(image, label, 8)  # rows shorter than the crop stay
  np.testing.assert_array_equal(lb, label[:, 1:9])


def test_evaluator_over_two_devices_pads_and_sums():
  """Two local devices: images of one shape are paired, leftovers padded."""
  script = textwrap.dedent("""
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
      import jax, numpy as np
      from dssn_jax.testing import evaluation as t
      from dssn_jax import evaluate, parallel
      assert jax.device_count() == 2
      recs = t.toy_records() + t.toy_records()[:2]  # shapes: a, b, c, a, b
      ev = evaluate.Evaluator(t.DecodeModel(), t.toy_config(), parallel.make_mesh(),
                              records=recs, class_names=t.NAMES3)
      assert ev.batch_size == 2
      cm = ev.confusion_matrices({'student': t.shift_vars(0)})['student']
      extra = sum(t.numpy_confusion(np.asarray(x['pred']), np.asarray(x['label']), 3)
                  for x in t.TOY[:2])
      np.testing.assert_array_equal(cm, t.TOY_CM + extra)
      print('OK')
      """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'OK' in proc.stdout


# ----------------------------------------------------------------------------
# Workdirs and the command line (the digits config, resnet_tiny).


def test_run_on_a_workdir_matches_the_evaluator(tmp_path):
  config, model, variables = make_workdir(tmp_path)
  val = datasets.get_source(config, 'val')
  records = [
    {'image': val[i]['image'], 'label': val[i]['mask'].astype(np.int32), 'id': val[i]['id']}
    for i in range(len(val))
  ]
  record = evaluate.run(workdir=str(tmp_path), checkpoint='best', records=records)
  assert record['step'] == 3 and record['split'] == 'eval' and record['mode'] == 'original'
  assert list(record['iou_per_class']) == list(datasets.class_names(config))
  want = evaluate.Evaluator(model, config, records=records).evaluate(variables)
  # The same evaluation program twice: same counts, float64 mIoU.
  assert record['miou'] == pytest.approx(want['miou'])
  assert record['miou_teacher'] == pytest.approx(want['miou_teacher'])
  json.dumps(record)  # the command line prints it
  with pytest.raises(ValueError, match='no checkpoint at step 7'):
    loading.load_for_eval(workdir=str(tmp_path), checkpoint='7')


def test_run_on_converted_weights(tmp_path):
  config, model, variables = make_workdir(tmp_path)
  path = state_dicts.save_npz(variables['teacher'], str(tmp_path / 'teacher.npz'))
  records = random_records([(40, 52)], num_classes=11, seed=4)
  record = evaluate.run(weights=path, config=config, records=records, mode='sliding_window')
  assert record['step'] is None and record['miou_teacher'] is None
  want = evaluate.Evaluator(model, config, mode='sliding_window', records=records).evaluate(
    {'student': variables['teacher']}
  )
  assert record['miou'] == pytest.approx(want['miou'])  # same program, float64 mIoU
  with pytest.raises(ValueError, match='needs --config'):
    loading.load_for_eval(weights=path)
  bad = tmp_path / 'w.ckpt'
  bad.write_bytes(b'')
  with pytest.raises(ValueError, match='w.ckpt'):
    loading.load_weights(str(bad), config)


def test_command_line_prints_the_eval_record(tmp_path):
  make_workdir(tmp_path)
  proc = run_module(
    'dssn_jax.evaluate', f'--workdir={tmp_path}', '--checkpoint=latest', '--mode=center_crop'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  assert record['step'] == 3 and record['mode'] == 'center_crop'
  assert set(record) >= {'step', 'split', 'miou', 'miou_teacher', 'iou_per_class'}
  assert len(record['iou_per_class']) == 11


def test_two_processes_sum_their_confusion_matrices():
  """Each process evaluates its share; the counts are summed over hosts."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = textwrap.dedent(f"""
      import sys
      import jax
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      pid = int(sys.argv[1])
      jax.distributed.initialize(coordinator_address='127.0.0.1:{port}',
                                 num_processes=2, process_id=pid)
      import numpy as np
      from dssn_jax.testing import evaluation as t
      from dssn_jax import evaluate, parallel
      share = t.toy_records()[pid::2]  # process 0: a and c, process 1: b
      ev = evaluate.Evaluator(t.DecodeModel(), t.toy_config(), parallel.make_mesh(),
                              records=share, class_names=t.NAMES3)
      out = ev.evaluate({{'student': t.shift_vars(0)}})
      assert abs(out['miou'] - t.TOY_MIOU) < 1e-6, out  # exact counts, float64 mIoU
      # Counts past int32 survive the sum over hosts.
      total = evaluate._sum_over_hosts(np.full((1, 3, 3), 2**31 + 5 * pid, np.int64))
      assert (total == 2**32 + 5).all(), total
      print('OK', pid)
      """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', script, str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  for i, proc in enumerate(procs):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f'OK {i}' in out


# ----------------------------------------------------------------------------
# Ahead-of-time compilation and shape buckets.


@pytest.mark.parametrize('background', [True, False])
def test_evaluation_after_precompile_compiles_nothing(background):
  """Every shape compiled ahead: the evaluation itself compiles no program,
  and gives the same confusion matrices as the plain (jit) path."""
  model = TinySeg()
  student, teacher = tiny_variables(model, 1), tiny_variables(model, 5)
  records = random_records([(13, 17), (12, 12), (17, 13), (13, 17), (9, 20)], seed=4)
  config = toy_config(crop=10)
  plain = evaluate.Evaluator(model, config, records=records, class_names=NAMES3)
  expected = plain.confusion_matrices({'student': student, 'teacher': teacher})

  ev = evaluate.Evaluator(model, config, records=records, class_names=NAMES3)
  with CompileCounter() as warmup:
    ev.precompile(student, background=background)
    ev.wait_precompiled()
  assert ev.precompile_error is None
  assert ev.num_compiled == 4  # the distinct shapes
  assert warmup.compiles >= 4
  with CompileCounter() as counter:
    got = ev.confusion_matrices({'student': student, 'teacher': teacher})
  assert counter.compiles == 0
  for name in ('student', 'teacher'):
    np.testing.assert_array_equal(got[name], expected[name])  # same programs' integer counts


def test_without_precompile_the_counter_sees_each_shape():
  """The counter the test above relies on does count evaluation compiles."""
  model = TinySeg()
  records = random_records([(11, 14), (14, 11), (11, 14)], seed=5)
  ev = evaluate.Evaluator(model, toy_config(crop=10), records=records, class_names=NAMES3)
  with CompileCounter() as counter:
    ev.confusion_matrices({'student': tiny_variables(model, 2)})
  assert counter.compiles >= 2  # one program per distinct shape (plus small helpers)


def test_pad_to_buckets_shapes_and_ignores_the_padding():
  model = TinySeg()
  records = random_records([(13, 17), (12, 12), (17, 13), (9, 20)], seed=6)
  ev = evaluate.Evaluator(model, toy_config(crop=10), records=records, pad_to=8, class_names=NAMES3)
  assert ev.record_shapes() == [(16, 24), (16, 16), (24, 16)]
  cms = ev.confusion_matrices({'student': tiny_variables(model, 3)})
  assert cms['student'].sum() == sum(int((r['label'] != 255).sum()) for r in records)
  image, label = evaluate.pad_to_multiple(
    np.ones((3, 5, 3), np.uint8), np.zeros((3, 5), np.int32), 4, 255
  )
  assert image.shape == (4, 8, 3) and image[3:].sum() == 0 and image[:, 5:].sum() == 0
  assert (label[3:] == 255).all() and (label[:, 5:] == 255).all() and (label[:3, :5] == 0).all()
  with pytest.raises(ValueError, match='eval_pad_to=-2'):
    evaluate.Evaluator(model, toy_config(), records=records, pad_to=-2)


def test_the_default_pads_on_accelerators_only():
  """`eval_pad_to=-1` (the default): exact shapes on a CPU (the reference
  protocol, what every test here evaluates), buckets of 64 on GPUs and TPUs."""
  assert config_lib.base_config().data.eval_pad_to == -1
  assert evaluate.resolve_pad_to(-1, 'cpu') == 0
  assert evaluate.resolve_pad_to(-1, 'gpu') == evaluate.resolve_pad_to(-1, 'tpu') == 64
  assert evaluate.resolve_pad_to(0, 'gpu') == 0 and evaluate.resolve_pad_to(32, 'cpu') == 32
  ev = evaluate.Evaluator(TinySeg(), toy_config(), records=[], class_names=NAMES3)
  assert ev.pad_to == (0 if jax.default_backend() == 'cpu' else 64)
