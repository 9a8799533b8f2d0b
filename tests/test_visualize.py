"""The prediction grid (dssn_jax/visualize.py) and the per-class IoU lines
(what a run writes of them, DIR/predictions.png and the lines after
`final:`, is checked by every config's two-step run in test_main.py)."""

import numpy as np
import pytest

from dssn_jax import train, visualize
from dssn_jax.testing.configs import load_config

PALETTE = np.array(
  [[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]], np.uint8
)
NAMES = ('background', 'red', 'green', 'blue', 'yellow')


def _panel_top(grid: np.ndarray, x: int, colour) -> int:
  """The first row of column `x` in `colour` (the panels lie above the legend)."""
  return int(np.nonzero((grid[:, x] == colour).all(-1))[0][0])


def test_colour_masks_uses_palette_and_grey_for_ignore():
  mask = np.array([[0, 1, 255], [4, 3, 2]])
  out = visualize.colour_masks(mask, PALETTE)
  assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
  np.testing.assert_array_equal(out[0, 0], PALETTE[0])
  np.testing.assert_array_equal(out[0, 1], PALETTE[1])
  np.testing.assert_array_equal(out[0, 2], np.array(visualize.IGNORE_COLOUR, np.uint8))
  np.testing.assert_array_equal(out[1], PALETTE[[4, 3, 2]])


def test_grid_puts_palette_colours_where_the_masks_say():
  cell, pad = 16, visualize._PAD
  label = np.ones((cell, cell), np.int32)
  label[4:8, 2:10] = 2
  label[12:14, 12:14] = 255
  teacher = np.full((cell, cell), 3, np.int32)
  teacher[0:5, 0:5] = 4
  student = np.zeros((cell, cell), np.int32)
  images = [np.full((cell, cell, 3), 90, np.uint8), np.full((8, 16, 3), 90, np.uint8)]
  labels = [label, np.full((8, 16), 2, np.int32)]
  grid = visualize.prediction_grid(
    images,
    labels,
    {'teacher': [teacher, teacher], 'student': [student, student]},
    PALETTE,
    NAMES,
    cell=cell,
  )
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
  assert grid.shape[1] == pad + 4 * (cell + pad)  # image | ground truth | teacher | student
  assert grid.shape[0] > 2 * (cell + pad)  # titles and the legend besides the rows
  gt_x, teacher_x, student_x = (pad + j * (cell + pad) for j in (1, 2, 3))
  top = _panel_top(grid, gt_x, PALETTE[1])
  np.testing.assert_array_equal(
    grid[top : top + cell, gt_x : gt_x + cell], visualize.colour_masks(label, PALETTE)
  )
  np.testing.assert_array_equal(
    grid[top : top + cell, teacher_x : teacher_x + cell], visualize.colour_masks(teacher, PALETTE)
  )
  assert (grid[top : top + cell, student_x : student_x + cell] == 0).all()
  # Row 2: an 8x16 label scaled to 16 wide, 8 high, centred vertically.
  row2 = top + cell + pad
  assert (grid[row2 + 4 : row2 + 12, gt_x : gt_x + cell] == PALETTE[2]).all()
  assert (grid[row2 : row2 + 4, gt_x : gt_x + cell] == 255).all()  # canvas


def test_grid_checks_its_inputs():
  with pytest.raises(ValueError, match='labels'):
    visualize.prediction_grid([np.zeros((4, 4, 3), np.uint8)], [], {}, PALETTE, NAMES)
  with pytest.raises(ValueError, match='teacher'):
    visualize.prediction_grid(
      [np.zeros((4, 4, 3), np.uint8)], [np.zeros((4, 4))], {'teacher': []}, PALETTE, NAMES
    )


def _record(step, teacher, student=None, ious_t=None, ious_s=None):
  return {
    'step': step,
    'split': 'eval',
    'miou': student,
    'miou_teacher': teacher,
    'iou_per_class': ious_s if student is not None else ious_t,
    'iou_per_class_teacher': ious_t,
  }


def test_per_class_lines_take_the_best_teacher_evaluation():
  history = [
    _record(
      1, 10.0, 9.0, {'background': 80.0, 'digit 0': 1.0}, {'background': 70.0, 'digit 0': 2.0}
    ),
    _record(
      2, 30.0, 20.0, {'background': 90.0, 'digit 0': 3.25}, {'background': 85.0, 'digit 0': 4.0}
    ),
    _record(
      3, 25.0, 30.0, {'background': 1.0, 'digit 0': 1.0}, {'background': 1.0, 'digit 0': 1.0}
    ),
  ]
  assert train.per_class_lines(history) == [
    'iou teacher (step 2, best teacher): background=90.0 digit_0=3.2',
    'iou student (step 2, best teacher): background=85.0 digit_0=4.0',
  ]
  # No student evaluated (`train.eval_student=False`): the teacher's line only.
  only = [_record(5, 12.0, None, {'a': 1.0})]
  assert train.per_class_lines(only) == ['iou teacher (step 5, best teacher): a=1.0']
  assert train.per_class_lines([]) == []


def test_per_class_lines_of_many_classes_name_the_ends():
  ious = {f'class {i}': float(i) for i in range(150)}
  (line,) = train.per_class_lines([_record(7, 50.0, None, ious)])
  assert line.startswith('iou teacher (step 7, best teacher; 150 classes, lowest 5 .. highest 5): ')
  assert 'class_0=0.0 ' in line and 'class_4=4.0 .. class_145=145.0' in line
  assert 'class_5=' not in line and line.endswith('class_149=149.0')


# A run writing DIR/predictions.png and the per-class lines: every config's
# two-step run in test_main.py checks both.


def test_the_baseline_per_class_line_follows_the_run_s_classes():
  """`config.baseline.iou_per_class` printed beside the run's lines, named
  by the run's classes; nothing when the counts differ or none is stored."""
  config = load_config('digits')
  config.baseline.iou_per_class = (90.0, 3.25)
  config.baseline.what, config.baseline.seeds = 'supervised on the same scenes', 3
  history = [_record(1, 10.0, 9.0, {'background': 80.0, 'digit 0': 1.0})]
  assert train.baseline_per_class_lines(config, history) == [
    'iou supervised (baseline, mean of 3 seeds): background=90.0 digit_0=3.2'
  ]
  config.baseline.iou_per_class = (90.0,)
  assert train.baseline_per_class_lines(config, history) == []
  config.baseline.iou_per_class = ()
  assert train.baseline_per_class_lines(config, history) == []
