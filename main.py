"""Trains a semi-supervised segmentation model.

    python main.py --config configs/digits.py --workdir runs/digits
    python main.py --config configs/pascal.py:split=92 --workdir runs/voc92 \
        --config.data.root=/data/VOC2012 --config.data.splits_dir=/data/splits/pascal

Multi-host (Cloud TPU pods, SLURM, Open MPI) is detected by
`jax.distributed.initialize()`; elsewhere pass --coordinator_address,
--num_processes and --process_id on every process (see launch/README.md).

A user error (a bad config value, a missing file, a workdir in use, a
non-finite loss) prints one `error: ...` line and exits with status 2
(`dssn_jax/cli.py`); docs/reliability.md lists the faults.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from dssn_jax import cli, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (configs/NAME.py[:ARG]).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and logs go.')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for multi-process runs outside Cloud TPU / SLURM / Open MPI.',
)
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).')
flags.DEFINE_bool(
  'distributed',
  None,
  'Force jax.distributed.initialize() with auto-detection '
  '(default: only when the flags above or a cluster environment say so).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  xla_flags.set_default_cpu_flags()  # before anything imports jax
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}', exitcode=2)
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    raise cli.UserError(f'--workdir {FLAGS.workdir} is a file; name a folder (it is created)')
  cli.quiet_library_logs()  # orbax logs every save at INFO
  from dssn_jax import distributed  # pylint: disable=g-import-not-at-top

  distributed.initialize(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, force=FLAGS.distributed
  )
  from dssn_jax import checkpoint, train  # pylint: disable=g-import-not-at-top

  with checkpoint.WorkdirLock(FLAGS.workdir):  # one run per workdir
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(cli.guarded(main), flags_parser=cli.parse_flags)
