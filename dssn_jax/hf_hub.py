"""Weights by name: `hf:ORG/REPO` -> a `model.safetensors` in the Hugging Face cache.

`config.model.pretrained='hf:facebook/dinov3-vitb16-pretrain-lvd1689m'` (or
`hf:facebook/dinov2-base`, `hf:timm/vit_base_patch16_dinov3.lvd1689m`, any
repository holding a `model.safetensors`) names the weights instead of a
path; every reader of weight files (`state_dicts.read_file`) resolves it
here, so the layout is then detected from the keys as for a local file.

Resolution: a copy already in `huggingface_hub`'s cache (`HF_HUB_CACHE`,
`HF_HOME`, default `~/.cache/huggingface/hub`) is used as is, online or not;
otherwise it is downloaded (online only), by process 0 alone on a
multi-host run while the others wait at a barrier and then read the same
cache (which must be shared between the hosts, e.g. `HF_HOME` on a shared
file system). Gated repositories (Meta's DINOv3) need the user's token
(`huggingface-cli login` or `HF_TOKEN`) and the licence accepted on the
repository's page. Needs `huggingface_hub` (`pip install -e '.[hub]'`).
"""

from __future__ import annotations

import os

PREFIX = 'hf:'
FILENAME = 'model.safetensors'


def is_name(src) -> bool:
  """Whether `src` is an `hf:` name rather than a path."""
  return isinstance(src, str) and src.startswith(PREFIX)


def _hub():
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('hf: weight names need huggingface_hub (pip install -e ".[hub]")') from None
  return huggingface_hub


def repo_of(name: str) -> str:
  """`hf:ORG/REPO` -> `ORG/REPO` (a clear error for anything else)."""
  repo = name[len(PREFIX) :]
  if repo.count('/') != 1 or not all(repo.split('/')):
    raise ValueError(f'{name!r}: an hf: name is hf:ORG/REPO, e.g. hf:facebook/dinov2-base')
  return repo


def cached(name: str, cache_dir: str | None = None) -> str | None:
  """The cached `model.safetensors` of `name`, or None."""
  path = _hub().try_to_load_from_cache(repo_of(name), FILENAME, cache_dir=cache_dir)
  return path if isinstance(path, str) and os.path.exists(path) else None


def resolve(name: str, cache_dir: str | None = None) -> str:
  """The local path of `name`'s `model.safetensors`: from the cache, else
  downloaded (process 0 of a multi-host run; the others wait for it).

  Raises:
    FileNotFoundError: one line naming the repository and the cache looked in
      (offline, gated without access, or no such file).
  """
  repo = repo_of(name)
  path = cached(name, cache_dir)
  if path is not None:
    return path
  hub = _hub()
  where = cache_dir or hub.constants.HF_HUB_CACHE
  import jax  # pylint: disable=g-import-not-at-top  (the process count)

  problem = None
  if jax.process_index() == 0:
    try:
      hub.hf_hub_download(repo, FILENAME, cache_dir=cache_dir)
    except (hub.errors.LocalEntryNotFoundError, hub.errors.OfflineModeIsEnabled):
      # (LocalEntryNotFoundError is an EntryNotFoundError: caught first.)
      problem = f'{name}: no {FILENAME} of {repo} in the Hugging Face cache {where}, and offline'
    except hub.errors.GatedRepoError:  # a RepositoryNotFoundError: caught before it
      problem = (
        f'{name}: {repo} is gated: log in (huggingface-cli login or HF_TOKEN) and accept its'
        f' licence on https://huggingface.co/{repo}'
      )
    except (hub.errors.RepositoryNotFoundError, hub.errors.EntryNotFoundError):
      problem = f'{name}: no {FILENAME} in the Hugging Face repository {repo}'
    except OSError as e:  # network trouble
      problem = (
        f'{name}: {FILENAME} of {repo} is not in the cache {where} and the download failed: {e}'
      )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(f'hf_hub {repo}')
  path = cached(name, cache_dir)
  if path is None:
    raise FileNotFoundError(
      problem
      or f'{name}: no {FILENAME} of {repo} in the Hugging Face cache {where}'
      ' (process 0 downloaded it: share HF_HOME between the hosts)'
    )
  return path
