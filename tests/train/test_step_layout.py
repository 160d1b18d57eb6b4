"""How the compiled training step lies over an FSDP mesh: every device computes its own rows.

On 8 fake CPU devices (mesh fsdp=8), the step of the quickstart tiny supernet with an external
teacher is compiled and its per-device shapes read from the compiled program: no array holds
the whole batch's rows (8 x 20 tokens) on one device, the external teacher's forward included.
Left to choose, XLA's partitioner kept FSDP-split parameters split and gathered the batch
instead: the teacher's whole-batch [8, 20, vocab] logits were computed on every device, until
its parameters were gathered as the students' are (`parallel.gather_fn`).
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, xla_flags_with_devices

SCRIPT = r'''
import json, re, sys, tempfile
import jax
from conftest import load_config, randomize
from elastic_jax import aot, export, parallel
from elastic_jax.workdir import build_space, init_supernet

ROWS, T = 8, 20
cfg = load_config('quickstart', 'tiny')
space = build_space(cfg)
folder = tempfile.mkdtemp()
teacher = export.export(randomize(init_supernet(cfg, space), 7, 0.05), space.cfg, space.largest())
export.save(teacher, folder + '/teacher', arch=space.largest())
cfg.train.distill.teacher = folder + '/teacher'
cfg.data.batch_size, cfg.data.seq_len = ROWS, T
cfg.mesh.update({'data': 1, 'fsdp': 8, 'tensor': 1})
mesh = parallel.make_mesh(cfg.mesh)
# The trainer's step, its state, batch and teacher as shapes laid out as the trainer lays them.
setup, (state, batch, teacher_params) = aot.train_program(cfg, mesh)
text = setup.step.lower(state, batch, teacher_params).compile().as_text()
# Per-device shapes [rows, T, features] (leading): the rows each device computes (times heads
# where attention merges them).
rows = sorted({int(r) for r in re.findall(rf'\[(\d+),{T},\d+\]', text)})
print(json.dumps({'devices': jax.device_count(), 'rows': rows}))
'''


@pytest.mark.slow
def test_fsdp_step_with_an_external_teacher_keeps_each_device_on_its_rows(tmp_path):
  script = tmp_path / 'layout_script.py'
  script.write_text(SCRIPT)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join([str(REPO / 'tests'), str(REPO)]),
         'XLA_FLAGS': xla_flags_with_devices(8)}
  r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out['devices'] == 8
  # 8 rows over 8 devices: 1 each. (Leading sizes 2 and 4 are rows x heads of attention; the
  # tiny space has at most 4 heads. Before the teacher's gather: [1, 2, 8].)
  assert 1 in out['rows'] and max(out['rows']) < 8, out
