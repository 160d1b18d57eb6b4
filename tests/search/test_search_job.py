"""The search job end to end on the tiny quickstart supernet: real validation-loss fitness.

Acceptance: a 20-generation search traces the fitness once; an interrupted search resumes to the
same population as an uninterrupted one; the outputs (pareto.json, history.jsonl, pareto.png,
summary.md) are complete and consistent with the evaluation module; bad budgets and a workdir
without a trained supernet fail with clear UserErrors; --pick exports the chosen member exactly.
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, lowerings

from elastic_jax import evaluation, proxies
from elastic_jax import export as export_lib
from elastic_jax.errors import UserError
from elastic_jax.search import budgets as budgets_lib
from elastic_jax.search import config as search_cfg
from elastic_jax.search import driver, job, objectives, pick, proxy_objective, report
from elastic_jax.search import fitness as fitness_lib
from elastic_jax.search import genomes as genomes_lib
from elastic_jax.search.hypervolume import pareto_front_mask
from elastic_jax.workdir import build_space


def _quickstart(arg):
  spec = importlib.util.spec_from_file_location('quickstart_cfg', REPO / 'configs' /
                                                'quickstart.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


def tiny_config(cache_dir, **search):
  """Every search below shares one compiled program (same objectives, population, budget and
  generations per call), so the file compiles the search loop once."""
  cfg = _quickstart('tiny')
  cfg.data.cache_dir = str(cache_dir)
  cfg.search = search_cfg.default_config()
  cfg.search.allow_untrained = True
  cfg.search.latency = False
  cfg.search.pop_size = 8
  cfg.search.generations = 6
  cfg.search.checkpoint_every = 5
  cfg.search.budgets.params = 70_000
  for k, v in search.items():
    cfg.search[k] = v
  return cfg


def _quiet(msg):
  del msg


@pytest.fixture(scope='module')
def searched(tmp_path_factory, cache_dir):
  """One finished search with a parameter budget and latency measurement (shared below)."""
  workdir = tmp_path_factory.mktemp('searched')
  cfg = tiny_config(cache_dir, generations=8, latency=True, latency_max=2, latency_repeats=2)
  result = job.run_search(cfg, workdir, log=_quiet)
  return cfg, workdir, result


def _recording_loss(seen: list):
  """The validation loss, recording on the host every genome the search asks it to compute
  (the population forward runs for those only): an independent log of the evaluations."""
  def fn(ctx):
    if ctx.active is not None:  # the search's calls (the report's host re-scoring passes none)
      jax.debug.callback(lambda g, a: seen.extend(np.asarray(g)[np.asarray(a)].tolist()),
                         ctx.genomes, ctx.active)
    return ctx.loss
  return objectives.Objective('loss_seen', fn, needs_model=True, description='recorded loss')


def _network_keys(space, genomes):
  archs = jax.vmap(space.decode)(jnp.asarray(genomes, jnp.int32))
  a, on = jax.tree.map(np.asarray, archs), np.asarray(archs.layer_on())
  return [_network_key(a, on, i) for i in range(len(genomes))]


def test_twenty_generations_evaluate_no_network_twice_and_trace_once(tmp_path, cache_dir):
  seen = []
  objectives.register_objective(_recording_loss(seen), overwrite=True)
  driver.advance.clear_cache()  # count from scratch whatever ran before
  cfg = tiny_config(cache_dir, generations=20, objectives=('loss_seen', 'params'))
  result = job.run_search(cfg, tmp_path, log=_quiet)  # 4 compiled calls of 5 generations
  jax.effects_barrier()
  assert result['fitness_traces'] == 1 and result['generations'] == 20
  # The smallest architecture is seeded (evaluated on the host, not by the search's forward);
  # the largest is over the 70k parameter budget.
  space = build_space(cfg)
  ckpt = np.load(tmp_path / 'search' / 'state.npz')
  n = int(ckpt['state_n_evals'])
  assert result['n_evals'] == n == len(seen) + 1
  # No network was computed twice (identity from the decoded arch, not the search's keys)...
  seen_keys = _network_keys(space, np.asarray(seen))
  assert len(set(seen_keys)) == len(seen_keys)
  # ...and the archive holds exactly those plus the seed, once each.
  archive_keys = _network_keys(space, ckpt['state_archive_AxG'][:n])
  smallest = _network_keys(space, genomes_lib.extreme_genome(space, 'params', False)[None])
  assert len(set(archive_keys)) == n and set(archive_keys) == set(seen_keys) | set(smallest)
  # The tiny space has only ~108 networks under the budget: far fewer than the 160 proposals,
  # so the old behaviour (scoring every proposal) would have repeated most of them.
  assert 60 <= n <= 109
  assert np.all(budgets_lib.Budgets(space, {'params': 70_000})(jnp.asarray(seen)))
  lines = (tmp_path / 'search' / 'history.jsonl').read_text().splitlines()
  history = [json.loads(l) for l in lines]
  assert [h['generation'] for h in history] == list(range(1, 21))
  # NSGA-II is elitist: the hypervolume only drops when the front outgrows the population and
  # crowding truncates it.
  for a, b in zip(history, history[1:]):
    assert b['hypervolume'] >= a['hypervolume'] - 1e-9 or b['front_size'] == 8
  assert history[-1]['hypervolume'] > history[0]['hypervolume']


def test_resume_continues_exactly(tmp_path, cache_dir):
  # 6 generations as one call of 5 and one of 1, versus 3 (a call with 2 masked generations), then
  # a resumed 3: the same program and the same per-generation keys give the same search.
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  job.run_search(tiny_config(cache_dir, generations=6), straight, log=_quiet)
  first = job.run_search(tiny_config(cache_dir, generations=3), split, log=_quiet)
  assert first['generations'] == 3
  resumed = job.run_search(tiny_config(cache_dir, generations=6), split, log=_quiet)
  assert resumed['generations'] == 6 and resumed['fitness_traces'] == 0  # same program reused
  a = np.load(straight / 'search' / 'state.npz')
  b = np.load(split / 'search' / 'state.npz')
  for k in ('state_genomes_PxG', 'state_fitness_PxM', 'state_birth_P', 'history_hv',
            'history_best', 'initial_genomes', 'state_archive_AxG', 'state_n_evals'):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert (json.loads((straight / 'search' / 'pareto.json').read_text())['front']
          == json.loads((split / 'search' / 'pareto.json').read_text())['front'])
  # The same search on a further-trained supernet starts over (its fitness values are stale)...
  messages = []
  from elastic_jax.workdir import init_supernet
  cfg = tiny_config(cache_dir, generations=3)
  again = job.run_search(cfg, split, model=init_supernet(cfg, build_space(cfg)), supernet_step=7,
                         log=messages.append)
  assert again['generations'] == 3 and any('starting the search over' in m for m in messages)
  # ...while a different search in the same workdir is refused, not silently mixed.
  with pytest.raises(UserError, match='different search.*pop_size'):
    job.run_search(tiny_config(cache_dir, generations=6, pop_size=10), split, log=_quiet)


def test_seed_archs_start_the_population_evaluated_once_each(tmp_path, cache_dir):
  """search.seed_archs: the file's architectures within the budget join the seeded smallest one
  in the first population, scored as the evaluation module scores them; one over the budget and
  a repeat are left out; the seeds are part of the search's identity (resume)."""
  from elastic_jax import arch as arch_lib
  from elastic_jax import data
  from elastic_jax.workdir import init_supernet
  cfg = tiny_config(cache_dir, generations=1)
  space = build_space(cfg)
  genomes = np.asarray(space.random_genomes(jax.random.key(3), 64))
  within = np.asarray(budgets_lib.Budgets(space, {'params': 70_000})(jnp.asarray(genomes)))
  chosen = [genomes[i] for i in np.flatnonzero(within)[:3]] + [genomes[np.argmin(within)]]
  lines = [arch_lib.dumps(space.decode(jnp.asarray(g))) for g in chosen]
  seeds = tmp_path / 'seeds.jsonl'
  seeds.write_text('\n'.join(lines + lines[:1]) + '\n')  # a repeat, and one over budget last
  cfg.search.seed_archs = str(seeds)
  result = job.run_search(cfg, tmp_path / 'w', log=_quiet)
  ckpt = np.load(tmp_path / 'w' / 'search' / 'state.npz')
  keys = [tuple(k) for k in np.asarray(genomes_lib.canonical_genomes(
      space, jnp.asarray([genomes_lib.extreme_genome(space, 'params', False)] + chosen[:3])))]
  assert [tuple(k) for k in ckpt['state_archive_AxG'][:4]] == keys
  ref = evaluation.evaluate_population(init_supernet(cfg, space), data.eval_batches(cfg.data),
                                       jax.vmap(space.decode)(jnp.asarray(chosen[:3])), chunk=1)
  np.testing.assert_allclose(ckpt['state_archive_fitness_AxM'][1:4, 0], ref['loss'], rtol=1e-5)
  assert result['n_evals'] == int(ckpt['state_n_evals']) >= 4
  # Other seeds make another search: its checkpoint is not resumed as this one.
  seeds.write_text(lines[0] + '\n')
  with pytest.raises(UserError, match='different search'):
    job.run_search(cfg, tmp_path / 'w', log=_quiet)


def test_the_seeded_start_and_the_front_masks_are_one_program_each(cache_dir):
  """The seeds' budget check, the seeded initial state (canonical keys, archive insert) and the
  report's front masks each run as one compiled program, not op by op: before, a search
  compiled some 100 tiny programs around its loop (seconds at XLA's default optimisation on a
  2-core CPU). Counted by JAX's own lowering events; the values are checked against NumPy."""
  cfg = tiny_config(cache_dir)
  space = build_space(cfg)
  budgets = budgets_lib.Budgets(space, {'params': 70_000})
  genomes = np.asarray(space.random_genomes(jax.random.key(11), 13))
  fitness = np.random.default_rng(0).normal(size=(13, 2)).astype(np.float32)
  searcher = driver.Searcher(lambda g, d, a=None: jnp.zeros((g.shape[0], 2)), space.gene_sizes,
                             2, 'nsga2', pop_size=8, archive_size=16,
                             key_fn=genomes_lib.CanonicalKey(space), feasible_fn=budgets)
  with lowerings() as lowered:
    ok = budgets.feasible(genomes)
    state = searcher.init_state(genomes, fitness)
    front = np.asarray(pareto_front_mask(fitness, ok))
  assert set(lowered) <= {'jit(_genome_costs)', 'jit(_initial_state)',
                          'jit(pareto_front_mask)'}, lowered
  assert len(lowered) <= 3, lowered
  params = genomes_lib.genome_costs(space, genomes)['params']
  np.testing.assert_array_equal(ok, params <= 70_000)
  np.testing.assert_array_equal(ok, jax.jit(budgets)(genomes))  # the search loop's constraint
  np.testing.assert_array_equal(np.asarray(state.genomes_PxG), genomes[:8])
  np.testing.assert_array_equal(np.asarray(state.best_M), fitness[:8].min(axis=0))
  assert int(state.n_evals) == 8
  np.testing.assert_array_equal(np.asarray(state.archive_AxG)[:8],
                                genomes_lib.canonical_genomes_host(space, genomes[:8]))
  dominated = [any(ok[j] and np.all(fitness[j] <= fitness[i]) and np.any(fitness[j] < fitness[i])
                   for j in range(13)) for i in range(13)]
  np.testing.assert_array_equal(front, ok & ~np.asarray(dominated))


def test_bad_seed_archs_are_one_clear_error(tmp_path, cache_dir):
  cfg = tiny_config(cache_dir, seed_archs=str(tmp_path / 'absent.jsonl'))
  with pytest.raises(UserError, match='absent.jsonl does not exist'):
    job.run_search(cfg, tmp_path / 'w', log=_quiet)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'hidden': 12345, 'depth': 1, 'head_dim': 8, 'layers': []}) + '\n')
  cfg.search.seed_archs = str(bad)
  with pytest.raises(UserError, match='bad.jsonl, architecture 1: .*hidden=12345'):
    job.run_search(cfg, tmp_path / 'w', log=_quiet)
  assert not (tmp_path / 'w').exists()


def test_front_is_rescored_on_held_out_batches_disjoint_from_selection(searched):
  from elastic_jax import data
  cfg, workdir, result = searched
  selection, heldout = job.validation_batches(cfg, 2)
  # Selection is what the search scored with (data.eval_batches); held out are the next two
  # batches of the same split, and share no row with selection.
  for got, want in zip(selection + heldout, data.eval_batches(
      data.DataConfig.from_config({**cfg.data.to_dict(), 'eval_batches': 4}))):
    np.testing.assert_array_equal(got['tokens'], want['tokens'])
  assert len(selection) == cfg.data.eval_batches and len(heldout) == 2
  sel_rows = {r.tobytes() for b in selection for r in b['tokens']}
  assert not sel_rows & {r.tobytes() for b in heldout for r in b['tokens']}
  pareto = json.loads((workdir / 'search' / 'pareto.json').read_text())
  assert pareto['selection_batches'] == len(selection) and pareto['heldout_batches'] == 2
  assert pareto['hypervolume_heldout'] is not None
  space = build_space(cfg)
  from elastic_jax.workdir import init_supernet
  model = init_supernet(cfg, space)  # the searched (untrained, seeded) supernet
  for entry in pareto['front'][:2] + [pareto['baselines']['smallest']]:
    dense = export_lib.export(model, space.cfg, space.decode(np.asarray(entry['genome'])))
    for batches, values in ((selection, entry['metrics']), (heldout, entry['heldout'])):
      want = evaluation.evaluate(dense, batches)
      assert values['loss'] == pytest.approx(want['loss'], rel=1e-4)
      assert values['accuracy'] == pytest.approx(want['accuracy'], abs=1e-4)
    assert entry['heldout']['loss'] != entry['metrics']['loss']
  summary = (workdir / 'search' / 'summary.md').read_text()
  assert 'held-out' in summary


def test_holdout_batches_default_follows_the_selection_count():
  import ml_collections
  def resolved(holdout, eval_batches=None):
    cfg = ml_collections.ConfigDict({'search': {'holdout_batches': holdout}})
    if eval_batches is not None:
      cfg.data = {'eval_batches': eval_batches}
    return search_cfg.search_config(cfg).holdout_batches
  assert resolved(-1, 3) == 3 and resolved(5, 3) == 5 and resolved(0, 3) == 0
  assert resolved(-1, 0) == 2 and resolved(-1) == 2  # the whole split / no data section
  with pytest.raises(UserError, match='holdout_batches must be >= 0, or -1'):
    resolved(-2, 3)


@pytest.mark.parametrize('holdout', [-1, 1])
def test_held_out_rescoring_runs_the_program_that_scored_the_front(cache_dir, tmp_path, holdout,
                                                                   monkeypatch):
  """By default (-1) the held-out set has as many batches as the selection set, so the front is
  re-scored by the compiled program that scored it: the same objectives, fitness and data
  shapes, no compile of its own. Another count (1) needs its own program."""
  cfg = tiny_config(cache_dir, holdout_batches=holdout)
  keys, real = [], fitness_lib._metrics_jit

  def spy(genomes, data, *, fn, objectives):
    leaves = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(data))
    keys.append((fn, objectives, jax.tree.structure(data), leaves))
    return real(genomes, data, fn=fn, objectives=objectives)

  monkeypatch.setattr(fitness_lib, '_metrics_jit', spy)
  log = lambda msg: keys.append('held-out') if 're-scoring the front' in msg else None
  pareto = job.run_search(cfg, tmp_path / 'w', log=log)['pareto']
  assert pareto['heldout_batches'] == (cfg.data.eval_batches if holdout == -1 else holdout)
  assert pareto['selection_batches'] == cfg.data.eval_batches == 2
  before, after = keys[:keys.index('held-out')], keys[keys.index('held-out') + 1:]
  assert before and after
  assert all((key in before) == (holdout == -1) for key in after)


def test_a_split_too_small_for_the_held_out_batches_warns_and_keeps_selection(cache_dir):
  cfg = tiny_config(cache_dir)
  messages = []
  selection, heldout = job.validation_batches(cfg, 10_000, messages.append)
  assert len(selection) == cfg.data.eval_batches and len(heldout) < 10_000
  assert any('room for only' in m for m in messages)


def test_outputs_are_complete_and_consistent(searched):
  cfg, workdir, result = searched
  out = workdir / 'search'
  pareto = json.loads((out / 'pareto.json').read_text())
  assert pareto == json.loads(json.dumps(result['pareto']))
  assert (out / 'pareto.png').read_bytes()[:4] == b'\x89PNG'
  summary = (out / 'summary.md').read_text()
  assert '## Front' in summary and 'pareto.png' in summary
  assert len((out / 'history.jsonl').read_text().splitlines()) == 8
  front = pareto['front']
  assert front and pareto['baselines']['smallest']['metrics']['params'] == 37472
  assert len(pareto['random']) > 0
  # Every member meets the budget, is distinct as a network, and the front is non-dominated.
  params = np.asarray([e['metrics']['params'] for e in front])
  loss = np.asarray([e['metrics']['loss'] for e in front])
  assert np.all(params <= 70_000) and np.all(np.diff(params) > 0)
  assert params[0] == 37472  # the seeded smallest architecture ends the front
  assert pareto_front_mask(np.stack([loss, params], 1)).all()
  space = build_space(cfg)
  genomes = jnp.asarray([e['genome'] for e in front])
  canon = np.asarray(genomes_lib.canonical_genomes(space, genomes))
  assert len({tuple(g) for g in canon.tolist()}) == len(front)
  # The loss is the evaluation module's loss of the same archs in the same supernet.
  from elastic_jax import data
  from elastic_jax.workdir import init_supernet
  archs = jax.vmap(space.decode)(genomes)
  ref = evaluation.evaluate_population(init_supernet(cfg, space), data.eval_batches(cfg.data),
                                       archs, chunk=1)
  np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)
  # Latency measured for 2 evenly spaced front members and the two baselines.
  measured = [e['latency_ms'] for e in front if e['latency_ms'] is not None]
  assert len(measured) == min(2, len(front)) and all(v > 0 for v in measured)
  assert pareto['baselines']['largest']['latency_ms'] > 0
  table = result['table'].splitlines()
  assert len(table) == len(front) + 1 and 'latency ms' in table[0]
  # A decoder: KV-cache decode latency too, for up to 2 front members and the baselines.
  decoded = [e['decode_latency'] for e in front if e['decode_latency'] is not None]
  assert len(decoded) == min(2, len(front))
  assert all(d['prefill_ms'] > 0 and d['per_token_ms'] > 0 for d in decoded)
  assert pareto['baselines']['largest']['decode_latency']['per_token_ms'] > 0
  assert 'ms/token' in table[0]


def test_pick_exports_the_chosen_member_exactly(searched, tmp_path):
  cfg, workdir, result = searched
  front = result['pareto']['front']
  bound = front[len(front) // 2]['metrics']['params']
  out = pick.export_pick(cfg, workdir, f'best-under:params={bound}', out=tmp_path / 'picked')
  chosen = front[out['index']]
  assert chosen['metrics']['params'] <= bound
  assert chosen['metrics']['loss'] == min(e['metrics']['loss'] for e in front
                                         if e['metrics']['params'] <= bound)
  dense, saved = export_lib.load(out['out'])
  assert out['params'] == chosen['metrics']['params'] == export_lib.param_count(dense)
  assert saved['search']['index'] == out['index'] and (tmp_path / 'picked' /
                                                       'tokenizer.json').is_file()
  # The export report carries the member's measured decode latency (None if not measured).
  assert saved['search']['decode_latency'] == chosen['decode_latency'] == out['decode_latency']
  from elastic_jax import data
  loss = evaluation.evaluate(dense, data.eval_batches(cfg.data))['loss']
  assert loss == pytest.approx(chosen['metrics']['loss'], rel=1e-5)
  default = pick.export_pick(cfg, workdir, 'knee')
  assert default['out'] == str(workdir / 'export' / f"front_{default['index']}")
  with pytest.raises(UserError, match='smallest on the front has .*37,472'):
    pick.export_pick(cfg, workdir, 'best-under:params=1000')


def test_budget_below_the_smallest_architecture_names_it(tmp_path, cache_dir):
  cfg = tiny_config(cache_dir)
  cfg.search.budgets.params = 30_000
  with pytest.raises(UserError, match=r'smallest achievable value.*37,472'):
    job.run_search(cfg, tmp_path, log=_quiet)
  cfg = tiny_config(cache_dir)
  cfg.search.budgets.flops = 10.0
  with pytest.raises(UserError, match=r'budgets.flops=10 .*smallest achievable'):
    job.run_search(cfg, tmp_path, log=_quiet)


def test_a_budget_must_be_positive_and_absolute(cache_dir):
  """A negative budget was kept (only 0 is 'no budget') and reported as below the smallest
  achievable value, 'raise the budget'; a value that is not a number was a ValueError."""
  for value, shown in ((-5, '-5'), (-0.5, '-0.5'), ('abc', "'abc'"), (float('nan'), 'nan')):
    with pytest.raises(UserError) as info:
      search_cfg.search_config({'search': {'budgets': {'params': value}}})
    assert str(info.value) == (
        f'search.budgets.params={shown} is invalid: a budget must be a positive number, an '
        'absolute upper bound in parameters (not a fraction), or 0 for no budget'), value
  with pytest.raises(UserError, match=r'budgets.kv_cache=-1 .* in KV-cache bytes per token'):
    budgets_lib.Budgets(build_space(_quickstart('tiny')), {'kv_cache': -1})
  sc = search_cfg.search_config({'search': {'budgets': {'params': 7e4, 'flops': 0}}})
  assert sc.budgets == (('params', 7e4),)
  cfg = tiny_config(cache_dir)
  cfg.search.budgets.params = 0.5  # a fraction, as `compress --budgets` takes
  with pytest.raises(UserError, match=r'raise the budget \(it is an absolute bound, not a '
                     r'fraction\)$'):
    budgets_lib.Budgets(build_space(cfg), dict(search_cfg.search_config(cfg).budgets)).check()


def test_empty_objectives_name_the_accepted_ones(tmp_path, cache_dir):
  """search.objectives=() said 'every objective is zero-cost; scoring the seeded
  initialisation' (an empty list is vacuously training-free) before its error."""
  logged = []
  cfg = tiny_config(cache_dir, objectives=())
  with pytest.raises(UserError) as info:
    job.run_search(cfg, tmp_path / 'w', log=logged.append)
  assert not logged and not (tmp_path / 'w').exists()
  message = str(info.value)
  assert message.startswith('search.objectives is empty; name at least one objective, e.g. '
                            '("loss", "params"), from: ')
  named = message.split('from: ')[1].split(', ')
  assert {'loss', 'perplexity', 'accuracy', 'params', 'flops', 'wpca'} <= set(named)
  for name in named:  # every name offered is one the search accepts
    assert objectives.get_objective(name).name == name
  with pytest.raises(UserError, match='search.objectives is empty'):
    search_cfg.search_config({'search': {'objectives': ''}})


def test_workdir_without_trained_supernet_says_to_train_first(tmp_path, cache_dir):
  cfg = tiny_config(cache_dir, allow_untrained=False)
  with pytest.raises(UserError, match='no trained supernet.*elastic-jax train'):
    job.run_search(cfg, tmp_path, log=_quiet)
  with pytest.raises(UserError, match='run `elastic-jax search'):
    pick.export_pick(cfg, tmp_path, 'knee')


def test_bad_search_config_is_reported():
  with pytest.raises(UserError, match='search.strategy'):
    search_cfg.search_config({'search': {'strategy': 'annealing'}})
  with pytest.raises(UserError, match='unknown objective .*speed'):
    objectives.get_objective('speed')
  with pytest.raises(UserError, match='search.colour is not a search config field'):
    search_cfg.search_config({'search': {'colour': 1}})


def _pareto(points, maximize=(False, False)):
  return {'objectives': ['loss', 'params'], 'maximize': list(maximize),
          'front': [{'index': i, 'objectives': {'loss': l, 'params': p},
                     'metrics': {'loss': l, 'params': p}, 'latency_ms': None}
                    for i, (l, p) in enumerate(points)],
          'baselines': {'smallest': {'metrics': {'loss': 9.0, 'params': 5.0}}}}


def test_pick_rules():
  # A convex front with an obvious knee at (2, 20).
  p = _pareto([(5.0, 10.0), (2.0, 20.0), (1.8, 40.0), (1.7, 80.0)])
  assert pick.choose(p, 'knee') == 1
  assert pick.choose(p, 'index:2') == 2 and pick.choose(p, 'index:-1') == 3
  assert pick.choose(p, 'best-under:params=40') == 2
  assert pick.choose(p, 'best-under:params=0.04k') == 2
  assert pick.parse_number('5M') == 5e6 and pick.parse_number('1_000') == 1000
  with pytest.raises(UserError, match='out of range'):
    pick.choose(p, 'index:4')
  with pytest.raises(UserError, match=r'params <= 9.*smallest on the front has 10.*space has 5'):
    pick.choose(p, 'best-under:params=9')
  with pytest.raises(UserError, match='not understood'):
    pick.choose(p, 'middle')
  with pytest.raises(UserError, match="no front member has a 'flop'"):
    pick.choose(p, 'best-under:flop=3')


def _network_key(a, on, i):
  """Host-side identity of arch i of a decoded batch: global sizes and the active layers."""
  layers = tuple((int(a.block[i, l]), int(a.heads[i, l]), int(a.kv_groups[i, l]),
                  int(a.ffn[i, l]), int(a.inner[i, l]))
                 for l in range(a.block.shape[1]) if on[i, l])
  return int(a.hidden[i]), int(a.head_dim[i]), layers


def test_canonical_genomes_identify_equal_networks(cache_dir):
  space = build_space(tiny_config(cache_dir))
  genomes = space.random_genomes(jax.random.key(0), 256)
  canon = genomes_lib.canonical_genomes(space, genomes)
  decoded = {}
  for name, g in (('raw', genomes), ('canon', canon)):
    archs = jax.vmap(space.decode)(g)
    a, on = jax.tree.map(np.asarray, archs), np.asarray(archs.layer_on())
    decoded[name] = [_network_key(a, on, i) for i in range(256)]
  # Canonicalising never changes the network, and equal networks get equal genomes.
  assert decoded['raw'] == decoded['canon']
  assert len(set(decoded['raw'])) == len({tuple(c) for c in np.asarray(canon).tolist()})
  assert len(set(decoded['raw'])) < len({tuple(g) for g in np.asarray(genomes).tolist()})
  g = np.asarray(genomes[0])
  assert export_lib.dense_dims(space.cfg, space.decode(g)) == \
      export_lib.dense_dims(space.cfg, space.decode(np.asarray(canon[0])))


@pytest.mark.parametrize('strategy', ['regularized', 'stratified'])  # nsga2: above; others:
# tests/search/test_search_driver.py
def test_every_strategy_runs_under_a_budget_with_cost_objectives(strategy, cache_dir):
  space = build_space(tiny_config(cache_dir))
  fit = fitness_lib.Fitness(space, ('flops', 'params'))
  budget = budgets_lib.Budgets(space, {'params': 60_000})
  sc = search_cfg.search_config({'search': {'strategy': strategy, 'pop_size': 8,
                                              'objectives': ('flops', 'params')}})
  searcher = job.make_searcher(fit, strategy, pop_size=8, feasible_fn=budget,
                               generations_per_call=4, archive_size=64,
                               **search_cfg.strategy_kwargs(sc, space))
  state, history = searcher.advance(searcher.init_state(), jax.random.key(1), 0, 6)
  st = jax.tree.map(np.asarray, state)
  # Evaluations are distinct networks (some proposals may be dropped, never scored twice).
  n = int(history['n_evals'][-1])
  assert 0.5 * 6 * searcher.spec.n_children <= n <= 6 * searcher.spec.n_children
  keys = {tuple(k) for k in st.archive_AxG[:n].tolist()}
  assert len(keys) == n
  np.testing.assert_array_equal(
      st.archive_AxG[:n], genomes_lib.canonical_genomes(space, st.archive_AxG[:n]))
  members = st.genomes_PxG[st.occupied_P & st.feasible_P]
  assert len(members) > 0
  assert np.all(genomes_lib.genome_costs(space, members)['params'] <= 60_000)
  assert fit.traces == 1


def test_report_table_and_history_rows():
  pareto = _pareto([(2.0, 2e6), (1.5, 4e6)])
  for e in pareto['front']:
    e['arch'] = {'hidden': 64, 'depth': 2, 'head_dim': 16, 'layers': [
        {'block': 'transformer', 'heads': 4, 'kv_groups': 2, 'ffn': 128, 'inner': 0},
        {'block': 'skip', 'heads': 4, 'kv_groups': 2, 'ffn': 128, 'inner': 0},
        {'block': 'transformer', 'heads': 2, 'kv_groups': 1, 'ffn': 64, 'inner': 0}]}
  text = report.format_table(pareto)
  assert 'h64 d1 hd16 [t4/2:128]' in text and '2.000' in text  # params in millions
  md = report.format_table(pareto, markdown=True)
  assert md.splitlines()[1].startswith('|---|')


def test_zero_cost_proxy_objective_matches_the_proxies_package(cache_dir):
  from elastic_jax import data
  from elastic_jax.workdir import init_supernet
  cfg = tiny_config(cache_dir)
  space = build_space(cfg)
  model, batches = init_supernet(cfg, space), data.eval_batches(cfg.data)
  cfg_proxy = proxies.default_config()
  cfg_proxy.num_batches = 2
  objectives.register_objective(proxy_objective.proxy_objective('wpca', cfg_proxy), overwrite=True)
  fit = fitness_lib.Fitness(space, ('wpca', 'params'), model=model, batches=batches)
  assert fit.maximize == (True, False)
  genomes = space.random_genomes(jax.random.key(3), 5)
  got = fit.evaluate(genomes)['wpca']
  want = proxies.score_archs(model, space, jax.vmap(space.decode)(genomes), batches, cfg_proxy,
                             names=('wpca',))['wpca']
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Minimised column = negated proxy.
  np.testing.assert_allclose(np.asarray(fit(genomes, fit.data))[:, 0], -got, rtol=1e-6)


def test_other_proxy_settings_in_the_same_process_never_reuse_the_stale_program(cache_dir):
  """Re-registering a proxy objective with other settings (as a second search with another
  `proxy` section does) gives another compiled fitness; equal settings share one."""
  from elastic_jax import data
  from elastic_jax.workdir import init_supernet
  cfg = tiny_config(cache_dir)
  space = build_space(cfg)
  model, batches = init_supernet(cfg, space), data.eval_batches(cfg.data)
  genomes = space.random_genomes(jax.random.key(4), 5)
  got, fns = {}, {}
  for eta in (0.99, 0.3, 0.99):
    cfg_proxy = proxies.default_config()
    cfg_proxy.num_batches = 2
    cfg_proxy.eta = eta
    objectives.register_objective(proxy_objective.proxy_objective('wpca', cfg_proxy),
                                   overwrite=True)
    fit = fitness_lib.Fitness(space, ('wpca', 'params'), model=model, batches=batches)
    got[eta] = fit.evaluate(genomes)['wpca']
    want = proxies.score_archs(model, space, jax.vmap(space.decode)(genomes), batches, cfg_proxy,
                               names=('wpca',))['wpca']
    np.testing.assert_allclose(got[eta], want, rtol=1e-5)
    fns.setdefault(eta, []).append(fit.fn)
  assert not np.allclose(got[0.99], got[0.3])  # the settings matter, so a stale program shows
  a, b = fns[0.99]
  assert a == b and hash(a) == hash(b)  # equal settings: one compiled search loop
  assert fns[0.3][0] != a
  budgets = [budgets_lib.Budgets(space, {'params': 7e4}) for _ in range(2)]
  assert budgets[0] == budgets[1] and hash(budgets[0]) == hash(budgets[1])
  assert budgets[0] != budgets_lib.Budgets(space, {'params': 6e4})


def test_training_free_search_with_a_proxy_fitness_needs_no_training(tmp_path, cache_dir):
  """`search.fitness=wpca` (the W-PCA paper's GA) runs on a workdir that was never trained, under
  its parameter budget, and the found architecture is the best W-PCA score it evaluated."""
  cfg = tiny_config(cache_dir, fitness='wpca', allow_untrained=False, generations=3)
  cfg.proxy = proxies.default_config()
  cfg.proxy.num_batches = 2
  sc = search_cfg.search_config(cfg)
  assert sc.objectives == ('wpca',) and search_cfg.resolve_strategy(sc) == 'ga'
  out = job.run_search(cfg, tmp_path, log=_quiet)
  assert not (tmp_path / 'checkpoints').exists()
  pareto = out['pareto']
  assert pareto['objectives'] == ['wpca'] and pareto['maximize'] == [True]
  assert pareto['supernet_step'] is None
  for member in pareto['front']:
    assert member['metrics']['params'] <= 70_000
  # One objective: the front is taken on (wpca, params), in increasing parameter count, so its
  # last member is the best score found under the budget.
  scores = [m['objectives']['wpca'] for m in pareto['front']]
  assert scores == sorted(scores) and scores[-1] >= max(r['metrics']['wpca'] for r in
                                                        pareto['random'])


def test_training_free_defaults_follow_the_wpca_paper():
  sc = search_cfg.search_config({'search': {'fitness': 'wpca'}})
  assert (sc.pop_size, sc.generations, search_cfg.resolve_strategy(sc)) == (50, 40, 'ga')
  sc = search_cfg.search_config({'search': {}})
  assert (sc.pop_size, sc.generations, sc.objectives) == (32, 30, ('loss', 'params'))
  with pytest.raises(UserError, match="search.fitness is 'loss', not a zero-cost proxy"):
    search_cfg.search_config({'search': {'fitness': 'loss'}})
