"""Writes the installed Python's documentation as JSON documents: run as a script, in a subprocess.

Importing ~200 standard-library modules can print, register handlers or warn; doing it in a child
process (`python -I stdlib_docs_dump.py OUT.json`) keeps all of that away from the caller. Uses only
the standard library, so it runs under `python -I` without the project on sys.path.

Output: a JSON list of [title, text] pairs, in a fixed order: the pydoc help topics, then one
document per module (docstring plus the signatures and docstrings of its public classes and
functions). The text depends only on the Python build, not on the machine or the run.
"""

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from pydoc_data.topics import topics

# Modules with side effects on import (browser, printing, GUI, installers) or that are tests.
_SKIP = frozenset({
    'antigravity', 'this', 'idlelib', 'tkinter', 'turtle', 'turtledemo', 'test', 'ensurepip',
    'venv', 'pydoc_data', 'lib2to3', 'pip', 'xxlimited', 'xxsubtype', 'msilib', 'msvcrt', 'nt',
    'winreg', 'winsound', 'encodings',
})
_LITERALS = (type(None), bool, int, float, complex, str, bytes)


class _Elided:
  def __repr__(self):
    return '...'


def _quiet_import(name):
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
      contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter('ignore')
    return importlib.import_module(name)


def _is_path(value):
  """A string default that names a file (platform.architecture(executable=sys.executable)):
  it would make the corpus depend on where Python or the virtual environment lives."""
  return isinstance(value, str) and ('/' in value or '\\' in value)


def _signature(obj):
  """The signature with only literal defaults spelled out.

  Other defaults are shown as '...': their reprs can hold memory addresses, the environment
  (cgi.parse(environ=os.environ)) or paths, which would make the corpus vary per run or machine
  and leak variables.
  """
  try:
    signature = inspect.signature(obj)
  except (TypeError, ValueError):
    return '(...)'
  params = []
  for param in signature.parameters.values():
    default = param.default
    if default is not param.empty and not (
        isinstance(default, _LITERALS) and len(repr(default)) <= 40 and not _is_path(default)):
      param = param.replace(default=_Elided())
    params.append(param.replace(annotation=param.empty))
  return str(signature.replace(parameters=params, return_annotation=signature.empty))


def _module_names():
  """Public stdlib modules and their public submodules, sorted."""
  names = []
  for top in sorted(sys.stdlib_module_names):
    if top.startswith('_') or top in _SKIP:
      continue
    names.append(top)
    try:
      module = _quiet_import(top)
    except BaseException:  # Any failure only means: skip this module.
      continue
    if not hasattr(module, '__path__'):
      continue
    subs = []
    for info in pkgutil.walk_packages(module.__path__, prefix=top + '.', onerror=lambda _: None):
      parts = info.name.split('.')
      if any(p.startswith('_') or 'test' in p for p in parts):
        continue
      subs.append(info.name)
    names.extend(sorted(subs))
  return names


def _render_module(name, module):
  lines = [f'Module {name}', '', inspect.cleandoc(module.__doc__ or '').strip(), '']
  for attr in sorted(vars(module)):
    if attr.startswith('_'):
      continue
    obj = vars(module)[attr]
    if getattr(obj, '__module__', None) != name or not (
        inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
      continue
    doc = inspect.cleandoc(obj.__doc__ or '').strip() if isinstance(obj.__doc__, str) else ''
    keyword = 'class' if inspect.isclass(obj) else 'def'
    lines += [f'{keyword} {attr}{_signature(obj)}', doc, '']
    if not inspect.isclass(obj):
      continue
    for member_name in sorted(vars(obj)):
      member = vars(obj)[member_name]
      if member_name.startswith('_') or not callable(member):
        continue
      member_doc = getattr(member, '__doc__', None)
      if not isinstance(member_doc, str) or not member_doc.strip():
        continue
      lines += [f'  {attr}.{member_name}{_signature(member)}',
                inspect.cleandoc(member_doc).strip(), '']
  text = '\n'.join(lines).strip()
  return text if len(text) > len(f'Module {name}') else ''


def collect():
  docs = [[f'topic {key}', topics[key].strip()] for key in sorted(topics) if topics[key].strip()]
  for name in _module_names():
    try:
      module = _quiet_import(name)
      text = _render_module(name, module)
    except BaseException:  # A module that cannot be imported here is skipped.
      continue
    if text:
      docs.append([f'module {name}', text])
  return docs


if __name__ == '__main__':
  warnings.simplefilter('ignore')
  documents = collect()
  with open(sys.argv[1], 'w', encoding='utf-8') as f:
    json.dump(documents, f, ensure_ascii=False)
