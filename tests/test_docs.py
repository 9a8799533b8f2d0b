"""The README and docs/ stay true: links resolve, named files exist, commands build.

- every relative link of README.md and docs/*.md (files, images, `#anchors`,
  in this file or another page) resolves;
- every repository path they name in backticks (`benchmarks/x.py`,
  `tests/...`, `dssn_jax/...`, `configs/...`, `launch/...`, `docs/...`) exists;
- every `configs/NAME.py[:ARG]` the README names, and every one in a code
  block of docs/, exists and its `get_config(ARG)` builds; every
  `--config.a.b=V` override in the same command names a key of that config;
- the README's two fresh-machine commands are there, exactly.

Nothing trains; the whole file runs in a few seconds.
"""

import importlib.util
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = sorted(
  os.path.join(REPO, 'docs', f) for f in os.listdir(os.path.join(REPO, 'docs')) if f.endswith('.md')
)
PAGES = [README, *DOCS]
FRESH_MACHINE = (
  'pip install -e . && python main.py --config configs/digits.py --workdir runs/digits',
  "pip install -e '.[test]' && pytest -q",
)
# Named on purpose as paths that do not exist (the error a newcomer sees).
MISSING_ON_PURPOSE = {'configs/nope.py'}

_FENCE = re.compile(r'^(```|~~~)')
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
_INLINE_CODE = re.compile(r'`([^`\n]+)`')
_REPO_PATH = re.compile(
  r'(?<![\w/.])((?:benchmarks|tests|dssn_jax|configs|launch|docs|ci)/[\w./-]*\w\.(?:py|md|sh|txt|png))'
)
_CONFIG = re.compile(r'(?<![\w/.])configs/(\w+)\.py(?::([^\s`\'"]+))?')


def _placeholder(path):
  """`configs/NAME.py`: a name in capitals stands for any."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem.isupper()


def _rel(path):
  return os.path.relpath(path, REPO)


def _split(path):
  """(prose lines, code blocks) of a markdown file; a code block is its lines."""
  prose, blocks, block = [], [], None
  with open(path, encoding='utf-8') as f:
    for line in f.read().splitlines():
      if _FENCE.match(line.strip()):
        if block is None:
          block = []
        else:
          blocks.append(block)
          block = None
      elif block is None:
        prose.append(line)
      else:
        block.append(line)
  return prose, blocks


def _slug(heading):
  """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
  text = re.sub(r'`|\*\*|\*', '', heading.strip()).lower()
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)
  text = re.sub(r'[^\w\- ]', '', text)
  return text.replace(' ', '-')


def _anchors(path):
  seen, out = {}, set()
  prose, _ = _split(path)
  for line in prose:
    m = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if m:
      slug = _slug(m.group(1))
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      out.add(slug if n == 0 else f'{slug}-{n}')
  return out


def _links(path):
  prose, _ = _split(path)
  text = '\n'.join(_INLINE_CODE.sub('', line) for line in prose)
  return [t for t in _LINK.findall(text) if not re.match(r'^[a-z][a-z0-9+.-]*:', t)]


@pytest.mark.parametrize('page', PAGES, ids=_rel)
def test_relative_links_and_anchors_resolve(page):
  broken = []
  for target in _links(page):
    file_part, _, anchor = target.partition('#')
    dest = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
    if not os.path.exists(dest):
      broken.append(f'{target}: no file {_rel(dest)}')
    elif anchor and (not dest.endswith('.md') or anchor not in _anchors(dest)):
      broken.append(f'{target}: no heading #{anchor} in {_rel(dest)}')
  assert not broken, f'{_rel(page)}: ' + '; '.join(broken)


@pytest.mark.parametrize('page', PAGES, ids=_rel)
def test_named_repository_paths_exist(page):
  with open(page, encoding='utf-8') as f:
    text = f.read()
  missing = sorted(
    {
      p
      for code in _INLINE_CODE.findall(text) + ['\n'.join(b) for b in _split(page)[1]]
      for p in _REPO_PATH.findall(code)
      if p not in MISSING_ON_PURPOSE
      and not _placeholder(p)
      and not os.path.exists(os.path.join(REPO, p))
    }
  )
  assert not missing, f'{_rel(page)} names files that do not exist: {missing}'


def _commands(page, everywhere):
  """The commands a page shows: code blocks (backslash continuations joined),
  and for the README its inline code spans too."""
  prose, blocks = _split(page)
  out = []
  for block in blocks:
    out += '\n'.join(block).replace('\\\n', ' ').splitlines()
  if everywhere:
    out += [c for line in prose for c in _INLINE_CODE.findall(line)]
  return [c for c in out if _CONFIG.search(c)]


def _load(name, arg):
  spec = importlib.util.spec_from_file_location(
    f'configs_{name}_docs', os.path.join(REPO, 'configs', f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _has_key(config, dotted):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return False
    node = node[part]
  return True


def _cases():
  cases = []
  for page in PAGES:
    for command in _commands(page, everywhere=page == README):
      cases.append(pytest.param(page, command, id=f'{_rel(page)}: {command[:80]}'))
  return cases


@pytest.mark.parametrize('page,command', _cases())
def test_shown_configs_exist_and_build(page, command):
  for m in _CONFIG.finditer(command):
    name, arg = m.group(1), m.group(2)
    if f'configs/{name}.py' in MISSING_ON_PURPOSE:
      continue
    assert os.path.isfile(os.path.join(REPO, 'configs', f'{name}.py')), command
    config = _load(name, arg)
    try:
      tokens = shlex.split(command)
    except ValueError:  # an inline span with a lone quote
      tokens = command.split()
    unknown = [
      t
      for t in tokens
      if t.startswith('--config.') and not _has_key(config, t[len('--config.') :].split('=')[0])
    ]
    assert not unknown, f'{_rel(page)}: {command}: no such config keys {unknown}'


def test_readme_shows_the_two_fresh_machine_commands_exactly():
  _, blocks = _split(README)
  lines = [line.strip() for block in blocks for line in block]
  for command in FRESH_MACHINE:
    assert command in lines, command


def test_every_config_is_in_the_readme_recipes():
  with open(README, encoding='utf-8') as f:
    text = f.read()
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py'))
  assert [n for n in names if f'configs/{n}.py' not in text] == []
