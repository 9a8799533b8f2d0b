"""grain training streams and evaluation records on tiny generated trees."""

import collections
import math

import jax
import numpy as np
import pytest
from absl import flags

from dssn_jax import config_lib, parallel
from dssn_jax.data import pipeline
from dssn_jax.testing import fake_datasets as fd
from dssn_jax.testing.configs import train_data

# key -> (dtype, rank) of a semi-supervised batch's arrays.
IMAGE, LABEL, BOX = (np.uint8, 3), (np.uint8, 2), (np.bool_, 2)  # labels: uint8 to the device
SEMI_KEYS = {
  **dict.fromkeys(('x', 'u_w', 'u_s1', 'u_s2', 'm_w', 'm_s1', 'm_s2'), IMAGE),
  **dict.fromkeys(('y', 'u_ignore', 'm_ignore'), LABEL),
  **dict.fromkeys(('box1', 'box2'), BOX),
}


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
  # 4 labeled, 10 unlabeled, 3 val images of mixed sizes, some below the crop.
  return fd.make_pascal(str(tmp_path_factory.mktemp('voc')))


def _config(voc, **data):
  return fd.config_for('pascal', *voc, crop_size=40, **data)


def _batches(data, n):
  return [data.local_batch() for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_keys_dtypes_and_shapes(voc):
  data = train_data(_config(voc), seed=0, process_index=0, process_count=1)
  assert (data.num_labeled, data.num_unlabeled, data.local_batch_size) == (4, 10, 2)
  batch = data.local_batch()
  assert set(batch) == set(SEMI_KEYS) | {'x_id', 'u_id', 'm_id'}
  for key, (dtype, rank) in SEMI_KEYS.items():
    shape = (2, 40, 40, 3) if rank == 3 else (2, 40, 40)
    assert batch[key].dtype == dtype and batch[key].shape == shape, key
  assert set(np.unique(batch['u_ignore'])) <= {0, 255}
  assert set(np.unique(batch['y'])) <= set(range(21)) | {255}
  data.close()


def test_global_batch_on_a_mesh(voc):
  mesh = parallel.make_mesh(jax.devices()[:1])
  data = train_data(_config(voc), mesh, seed=0, process_index=0, process_count=1)
  batch = next(data)
  assert set(batch) == set(SEMI_KEYS)
  assert isinstance(batch['x'], jax.Array) and batch['x'].shape == (2, 40, 40, 3)
  assert batch['y'].dtype == np.uint8 and batch['box1'].dtype == np.bool_
  data.close()


def test_supervised_gives_only_labeled_views(voc):
  config = _config(voc)
  config.method = 'supervised'
  data = train_data(config, seed=0, process_index=0, process_count=1)
  assert data.num_unlabeled == 0
  batches = _batches(data, 2)
  assert set(batches[0]) == {'x', 'y', 'x_id'}
  # An epoch is a pass over the labeled list (4 images, batch 2).
  assert sorted(np.concatenate([b['x_id'] for b in batches])) == sorted(
    f'JPEGImages/2007_{i:06d}.jpg' for i in range(4)
  )


def test_supervised_warmup_batches_hold_the_labeled_views_alone(voc):
  """The steps of a supervised warm-up read x, y only: their batches skip the
  unlabeled and partner views, and every batch after them, on one host or
  two, is the one the plain stream gives (each record depends only on its
  position)."""
  config = _config(voc)
  config.train.warmup_terms = 'supervised'
  config.train.steps, config.train.warmup_steps = 10, 2
  plain = _batches(train_data(config, seed=5, process_index=0, process_count=1), 4)
  data = train_data(config, seed=5, process_index=0, process_count=1, labeled_only_steps=None)
  assert data.labeled_only_steps == 2
  warm = _batches(data, 4)
  for step in (0, 1):
    assert set(warm[step]) == {'x', 'y', 'x_id'}
    _assert_same(warm[step], {k: plain[step][k] for k in ('x', 'y', 'x_id')})
  for step in (2, 3):
    _assert_same(warm[step], plain[step])
  # Two hosts (one record each): host 1's first full batch is step 2's second record.
  host1 = train_data(config, seed=5, process_index=1, process_count=2, labeled_only_steps=None)
  batches = _batches(host1, 3)
  assert set(batches[1]) == {'x', 'y', 'x_id'}
  assert batches[2]['u_id'][0] == plain[2]['u_id'][1]
  # The spec a full step's program compiles for, before any such batch exists.
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = train_data(
    config, mesh, seed=5, process_index=0, process_count=1, labeled_only_steps=None
  ).batch_spec()
  assert set(spec) == set(SEMI_KEYS)
  for key, value in spec.items():
    assert (value.shape, value.dtype) == (plain[2][key].shape, plain[2][key].dtype), key
    assert value.sharding == parallel.data_sharding(mesh)


def test_same_seed_same_batches_other_seed_differs(voc):
  config = _config(voc)
  a = _batches(train_data(config, seed=3, process_index=0, process_count=1), 3)
  b = _batches(train_data(config, seed=3, process_index=0, process_count=1), 3)
  for x, y in zip(a, b):
    _assert_same(x, y)
  c = train_data(config, seed=4, process_index=0, process_count=1).local_batch()
  assert not np.array_equal(a[0]['u_s1'], c['u_s1'])


def test_epoch_covers_lists_and_hosts_are_disjoint(voc):
  # Two hosts, global batch 2 (1 each): one epoch of 10 unlabeled = 5 steps.
  config = _config(voc)
  config.data.mix_partner = 'shuffled'  # the default, 'same', reads the unlabeled order
  ids = collections.defaultdict(list)
  for index in (0, 1):
    data = train_data(config, seed=0, process_index=index, process_count=2)
    assert data.local_batch_size == 1
    for batch in _batches(data, 5):
      for stream in ('x', 'u', 'm'):
        ids[stream, index].extend(batch[f'{stream}_id'])
  unlabeled = {f'JPEGImages/2007_{i:06d}.jpg' for i in range(4, 14)}
  for stream in ('u', 'm'):
    assert not set(ids[stream, 0]) & set(ids[stream, 1])
    assert set(ids[stream, 0]) | set(ids[stream, 1]) == unlabeled
  # The mix partner is ordered independently of the unlabeled stream.
  assert ids['u', 0] + ids['u', 1] != ids['m', 0] + ids['m', 1]
  # Labeled: 4 images repeated to the epoch length of 10 (each 2 or 3 times).
  counts = collections.Counter(ids['x', 0] + ids['x', 1])
  assert len(counts) == 4 and set(counts.values()) <= {2, 3}


def test_mix_partner_same_order_option(voc):
  config = _config(voc)
  config.data.mix_partner = 'same'  # the reference's zip(loader_u, loader_u)
  batch = train_data(config, seed=0, process_index=0, process_count=1).local_batch()
  np.testing.assert_array_equal(batch['u_id'], batch['m_id'])
  assert not np.array_equal(batch['u_w'], batch['m_w'])


def test_restored_iterator_continues_with_the_next_batch(voc):
  config = _config(voc)
  data = train_data(config, seed=1, process_index=0, process_count=1)
  _batches(data, 2)
  state = data.get_state()
  expected = _batches(data, 2)
  fresh = train_data(config, seed=1, process_index=0, process_count=1)
  fresh.set_state(state)
  for got, want in zip(_batches(fresh, 2), expected):
    _assert_same(got, want)
  assert set(data.checkpoint_items()) == {'train'}


def test_worker_processes_match_in_process_and_resume(voc):
  # One test with grain workers (they take seconds to start).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  config = _config(voc)
  reference = _batches(train_data(config, seed=2, process_index=0, process_count=1), 4)
  config.data.workers = 2
  data = train_data(config, seed=2, process_index=0, process_count=1)
  try:
    first = _batches(data, 2)
    state = data.get_state()
    rest = _batches(data, 2)
    data.set_state(state)  # rewind: the same two batches again
    again = _batches(data, 2)
  finally:
    data.close()
  for got, want in zip(first + rest + again, reference + reference[2:]):
    _assert_same(got, want)
  assert state == {'train': {'position': 2}}  # the same whatever the worker count
  # The position written with 2 workers restores in-process, and a run's
  # worker count can change between batches: the same batches either way.
  config.data.workers = 0
  data = train_data(config, seed=2, process_index=0, process_count=1)
  try:
    data.set_state(state)
    after = _batches(data, 1)
    data.resize_workers(1)
    after += _batches(data, 1)
    assert data.workers == 1 and data.get_state() == {'train': {'position': 4}}
  finally:
    data.close()
  for got, want in zip(after, reference[2:]):
    _assert_same(got, want)


def test_bad_train_configs(voc):
  with pytest.raises(ValueError, match='batch_size=3 must be a positive multiple'):
    train_data(_config(voc, batch_size=3), seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    train_data(_config(voc, batch_size=12), seed=0, process_index=0, process_count=1)
  config = _config(voc)
  config.data.mix_partner = 'other'
  with pytest.raises(ValueError, match="mix_partner='other'"):
    train_data(config, seed=0, process_index=0, process_count=1)


def test_eval_records_modes_and_host_padding(voc):
  config = _config(voc)
  # val: 3 images of sizes (30, 30), (72, 96), (50, 37).
  whole = list(pipeline.eval_records(config, 'original', process_index=0, process_count=1))
  assert [r['image'].shape[:2] for r in whole] == [(30, 30), (72, 96), (50, 37)]
  for r in whole:
    assert r['image'].dtype == np.uint8 and r['label'].dtype == np.int32
    assert r['label'].shape == r['image'].shape[:2]
  crops = list(pipeline.eval_records(config, 'center_crop', process_index=0, process_count=1))
  assert all(r['image'].shape == (40, 40, 3) for r in crops)
  assert (crops[0]['label'][30:] == 255).all()  # the 30x30 image padded
  np.testing.assert_array_equal(crops[1]['label'], whole[1]['label'][16:56, 28:68])
  np.testing.assert_array_equal(crops[2]['label'][:, :37], whole[2]['label'][5:45])
  assert (crops[2]['label'][:, 37:] == 255).all()
  # Two hosts: 2 records each, the second host's last one is padding.
  shares = [
    list(pipeline.eval_records(config, 'sliding_window', process_index=i, process_count=2))
    for i in (0, 1)
  ]
  assert [len(s) for s in shares] == [2, 2]
  assert [r['id'] for r in shares[0]] == [whole[0]['id'], whole[2]['id']]
  assert shares[1][0]['id'] == whole[1]['id'] and shares[1][1]['id'] == ''
  assert (shares[1][1]['label'] == 255).all()
  with pytest.raises(ValueError, match="'tiles'"):
    pipeline.eval_records(config, 'tiles', process_index=0, process_count=1)


def test_auto_workers_feed_the_target_step_within_the_cores():
  config = config_lib.base_config()  # VOC recipe: crop 513, dssn
  cost = pipeline.SAMPLE_CPU_S['voc']
  per_step = 8 * (cost['labeled'] + cost['unlabeled'] + cost['partner'])
  assert pipeline.input_cpu_s_per_step(config, 8) == pytest.approx(per_step)
  config.data.workers_step_s = 0.1
  need = math.ceil(per_step / 0.1)
  assert pipeline.auto_workers(config, 8, cores=64) == need  # not more than the step needs
  assert pipeline.auto_workers(config, 8, cores=2) == 1  # one core left to the main process
  config.data.workers_step_s = 100.0
  assert pipeline.auto_workers(config, 8, cores=64) == 1
  # A supervised method reads labeled views only.
  assert pipeline.input_cpu_s_per_step(config, 8, unlabeled=False) == pytest.approx(
    8 * cost['labeled']
  )
  config.data.workers = -2
  with pytest.raises(ValueError, match='config.data.workers=-2'):
    pipeline._check_train_config(config)


def test_a_checkpoint_of_grain_state_still_restores(voc):
  """Checkpoints written before the position state hold grain's iterator
  state: it restores (with the worker count that wrote it) and is kept."""
  config = _config(voc)
  data = train_data(config, seed=3, process_index=0, process_count=1)
  try:
    _batches(data, 2)
    old = {'train': data._iterator._inner.get_state()}  # what such a checkpoint holds
    want = _batches(data, 1)
  finally:
    data.close()
  assert 'position' not in old['train']
  data = train_data(config, seed=3, process_index=0, process_count=1)
  try:
    data.set_state(old)
    _assert_same(_batches(data, 1)[0], want[0])
    assert 'position' not in data.get_state()['train']
  finally:
    data.close()
