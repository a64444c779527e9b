"""Study files: the schema, the expansion into trials, and every problem reported at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from nem_study.config import DEFAULTS, NETWORK_DEFAULTS, InputError, RunConfig, replace
from nem_study.study_config import StudyConfig, load_study_config
from nem_study.trials import expand_trials

ROOT = Path(__file__).resolve().parents[1]

VALID = """
name: small
base:
  data: {name: static_shapes, train: 64, valid: 16, test: 16, seed: 7}
  model: {em_steps: 3}
  train: {batch_size: 16, seed: 10}
grid:
  model.k: [2, 3]
  data.objects: [2, 3]
seeds: 2
stop: {max_epochs: 4, time_budget_s: 60}
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nem_study.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


def test_grid_times_seeds_expands_to_resolved_trials(tmp_path):
    study = load_study_config(write(tmp_path, VALID))
    assert isinstance(study.base, RunConfig)
    trials = expand_trials(study)
    assert [t.name for t in trials] == [
        f"k={k},objects={o},seed={s}" for k in (2, 3) for o in (2, 3) for s in (10, 11)]
    assert [t.index for t in trials] == list(range(8))
    for t in trials:
        c = t.config
        assert (c.model.k, c.data.objects) == (t.cell["model.k"], t.cell["data.objects"])
        assert c.train.seed == t.seed
        assert c.data.seed == 7                        # seeds share the data
        assert (c.train.max_epochs, c.train.time_budget_s) == (4, 60)   # stop applies to every trial
        assert (c.model.em_steps, c.model.network, c.train.batch_size) == (3, "static_fc", 16)
    assert len({t.name for t in trials}) == 8


def test_grid_values_are_resolved_with_their_own_defaults(tmp_path):
    """A grid over data.name gets each data set's defaults, not the base's resolved ones."""
    study = load_study_config(write(tmp_path, "name: sets\ngrid:\n  data.name: [static_shapes, flying_mnist]\n"))
    static, mnist = (t.config for t in expand_trials(study))
    assert (static.model.network, static.data.frames, static.noise.prob) == ("static_fc", 1, 0.1)
    assert (mnist.model.network, mnist.model.pixel, mnist.train.lr) == ("flying_mnist_conv", "gaussian", 5e-4)
    assert [t.name for t in expand_trials(study)] == ["name=static_shapes,seed=0", "name=flying_mnist,seed=0"]


def test_no_grid_is_one_trial_per_seed(tmp_path):
    trials = expand_trials(load_study_config(write(tmp_path, "name: one\nseeds: 3\n")))
    assert [t.name for t in trials] == ["seed=0", "seed=1", "seed=2"]


def test_same_field_name_in_two_sections_uses_dotted_keys(tmp_path):
    study = load_study_config(write(tmp_path, "name: kinds\ngrid:\n  model.kind: [rnn_em]\n"
                                              "  noise.kind: [bitflip, none]\n"))
    assert [t.name for t in expand_trials(study)] == [
        "model.kind=rnn_em,noise.kind=bitflip,seed=0", "model.kind=rnn_em,noise.kind=none,seed=0"]


@pytest.mark.parametrize("text,needle", [
    ("name: s\ngrid:\n  model.k: [2, 0]\n", "grid.model.k[1]: Input should be greater than or equal to 1 (got 0)"),
    ("name: s\ngrid:\n  model.kk: [2]\n", "grid.model.kk: not a run-config key"),
    ("name: s\ngrid:\n  k: [2]\n", "grid.k: not a run-config key"),
    ("name: s\ngrid:\n  train.seed: [1, 2]\n", "grid.train.seed: not allowed in a grid: set by `seeds`"),
    ("name: s\ngrid:\n  noise.prob: []\n", "grid.noise.prob: expected a non-empty list"),
    ("name: s\ngrid:\n  noise.prob: 0.1\n", "grid.noise.prob: Input should be a valid list"),
    ("name: s\ngrid:\n  data.name: [flying_cats]\n", "grid.data.name[0]: Input should be"),
    ("name: s\nbase:\n  data: {name: static_shapes}\ngrid:\n  data.frames: [1, 5]\n",
     "grid.data.frames[1]: Value error, static_shapes has frames = 1 (got 5)"),
    ("name: s\nbase:\n  data: {name: flying_shapes}\ngrid:\n  data.name: [static_shapes]\n  data.frames: [3]\n",
     "grid: the cell name=static_shapes,frames=3 gives data: Value error, static_shapes has frames = 1"),
    ("name: s\nbase:\n  model: {kk: 1}\n", "base.model.kk: unknown key"),
    ("name: s\nseeds: 0\n", "seeds: Input should be greater than or equal to 1"),
    ("name: s\nresources: {cpu: 0}\n", "resources.cpu: Input should be greater than 0"),
    ("name: s\nresources: {gpu: -0.5}\n", "resources.gpu: Input should be greater than or equal to 0"),
    ("name: s\nstop: {max_epochs: 0}\n", "stop.max_epochs: Input should be greater than or equal to 1"),
    ("name: s\ntracking: {url: x}\n", "tracking.url: unknown key"),
    ("name: s\nmax_failures: -1\n", "max_failures: Input should be greater than or equal to 0"),
    ("name: s\nsearch: {n_trials: 3}\n", "search.space: Field required"),
    ("name: s\nsearch: {n_trials: 0, space: {train.lr: {low: 0.1, high: 1}}}\n",
     "search.n_trials: Input should be greater than or equal to 1"),
    ("name: s\nsearch: {n_trials: 2, metric: ami, space: {train.lr: {low: 0.1, high: 1}}}\n",
     "search.metric: Input should be 'valid_loss' or 'valid_ami'"),
    ("name: s\nsearch: {n_trials: 2, space: {model.kk: {low: 1, high: 2}}}\n",
     "search.space.model.kk: not a run-config key"),
    ("name: s\nsearch: {n_trials: 2, space: {train.seed: {choices: [1, 2]}}}\n",
     "search.space.train.seed: not allowed in a search space: set by `seeds`"),
    ("name: s\ngrid: {model.k: [2, 3]}\nsearch: {n_trials: 2, space: {model.k: {low: 2, high: 5}}}\n",
     "search.space.model.k: already a grid key"),
    ("name: s\nsearch: {n_trials: 2, space: {train.lr: {low: 0.1, high: 0.01}}}\n",
     "search.space.train.lr: Value error, low must be below high"),
    ("name: s\nsearch: {n_trials: 2, space: {train.lr: {low: 0.0, high: 0.1, log: true}}}\n",
     "search.space.train.lr: Value error, a log range needs low > 0"),
    ("name: s\nsearch: {n_trials: 2, space: {train.lr: {low: 0.1}}}\n",
     "search.space.train.lr: Value error, expected low and high (and optionally log), or choices"),
    ("name: s\nsearch: {n_trials: 2, space: {model.k: {low: 0, high: 4}}}\n",
     "search.space.model.k.low: Input should be greater than or equal to 1 (got 0)"),
    ("name: s\nsearch: {n_trials: 2, space: {noise.prob: {choices: [0.1, 2.0]}}}\n",
     "search.space.noise.prob.choices[1]: Input should be less than or equal to 1 (got 2.0)"),
    ("name: s\nseeds: 2\nsearch: {n_trials: 2, space: {train.lr: {low: 0.001, high: 0.01}}}\n",
     "seeds: with `search`, each sampled config is trained once"),
    ("name: s\nensemble: true\nscheduler: {grace_period: 1}\n", "scheduler: not with `ensemble: true`"),
    ("name: s\nensemble: true\nbase:\n  data: {name: flying_mnist}\ngrid:\n  data.curriculum: [null, [20, 500]]\n",
     "ensemble: a curriculum is trained stage by stage"),
    ("name: s\nensemble: true\nbase:\n  train: {compile: true}\n", "base.train.compile: not with `ensemble: true`"),
    ("grid: {}\n", "name: Field required"),
    ("name: a b\n", "name: String should match pattern"),
])
def test_each_problem_names_its_yaml_path(tmp_path, text, needle):
    with pytest.raises(InputError) as err:
        load_study_config(write(tmp_path, text))
    assert needle in str(err.value), str(err.value)


BROKEN = """
name: broken
base:
  model: {k: 0}
grid:
  model.k: [2, -1, three]
  model.nope: [1]
  noise.prob: [0.1, 2.0]
seeds: 0
resources: {cpu: 1, tpu: 1}
"""


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(InputError) as err:
        load_study_config(write(tmp_path, BROKEN))
    text = str(err.value)
    expected = ["base.model.k: Input should be greater than or equal to 1", "seeds:", "resources.tpu: unknown key",
                "grid.model.k[1]:", "grid.model.k[2]:", "grid.model.nope:", "grid.noise.prob[1]:"]
    for needle in expected:
        assert needle in text, (needle, text)
    assert text.splitlines()[0].endswith(f"{len(expected)} problem(s)"), text
    assert "grid.model.k[0]" not in text   # k=2 is fine; the base's own k=0 is not blamed on it


def test_the_schema_is_the_same_without_yaml():
    with pytest.raises(ValidationError) as err:
        StudyConfig.model_validate({"name": "s", "grid": {"model.k": [3, 0]}})
    assert [e["loc"] for e in err.value.errors()] == [("grid", "model.k[1]")]
    study = StudyConfig(name="s", base=RunConfig.model_validate({"model": {"k": 4}}), seeds=2)
    assert [t.config.model.k for t in expand_trials(study)] == [4, 4]


def test_validate_prints_the_trials(tmp_path):
    r = cli("validate", write(tmp_path, VALID))
    assert r.returncode == 0, r.stderr
    assert "8 trial(s) (4 grid cell(s) x 2 seed(s))" in r.stdout
    assert "k=3,objects=3,seed=11" in r.stdout
    r = cli("validate", write(tmp_path, VALID), "--set", "ensemble=true")
    assert r.returncode == 0, r.stderr
    assert "the 2 seed(s) of each grid cell train together in one Ray trial (4 Ray trial(s))" in r.stdout


SEARCH = """
name: searched
base:
  data: {name: static_shapes, train: 64, valid: 16, test: 16}
grid:
  model.k: [2, 3]
search:
  n_trials: 5
  metric: valid_ami
  space:
    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    model.hidden: {low: 8, high: 64}
    model.psi_init: {choices: [zero, median]}
"""


def test_a_search_is_n_trials_per_grid_cell(tmp_path):
    study = load_study_config(write(tmp_path, SEARCH))
    search = study.search
    assert (search.n_trials, search.seed, search.metric, search.mode) == (5, 0, "valid_ami", "max")
    assert search.space["model.hidden"].integer and not search.space["train.lr"].integer
    assert search.space["train.lr"].log and search.space["model.psi_init"].choices == ["zero", "median"]
    assert [t.name for t in expand_trials(study)] == ["k=2,seed=0", "k=3,seed=0"]   # one spec per cell
    for command in (["validate"], ["run", "--dry-run"]):
        r = cli(*command[:1], write(tmp_path, SEARCH), *command[1:])
        assert r.returncode == 0, r.stderr
        assert "10 trial(s) (2 grid cell(s) x 5 sampled trial(s))" in r.stdout
        assert "train.lr, model.hidden, model.psi_init, valid_ami (max), seed 0" in r.stdout


def test_validate_exits_2_with_every_problem_and_no_traceback(tmp_path):
    r = cli("validate", write(tmp_path, BROKEN))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "7 problem(s)" in r.stderr and "grid.model.k[2]" in r.stderr and "grid.noise.prob[1]" in r.stderr
    r = cli("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_shipped_studies_are_valid():
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        assert expand_trials(load_study_config(path)), path


@pytest.mark.parametrize("command", ["validate", "run", "resume"])
def test_study_commands_have_help(command):
    r = cli(command, "--help")
    assert r.returncode == 0 and f"usage: nem-study {command}" in r.stdout


def test_evaluations_get_stable_names_and_a_repeated_name_is_an_error():
    from nem_study.study_config import StudyConfig

    study = StudyConfig.model_validate({"name": "s", "evaluations": [
        {"k": 5, "objects": 3}, {"steps": 50}, {"static": True, "steps": 50}, {"name": "mine", "k": 2}, {}]})
    assert [e.label for e in study.evaluations] == ["k5-objects3", "steps50", "static-steps50", "mine", "as-trained"]
    with pytest.raises(ValidationError, match="a second evaluation named 'k5'"):
        StudyConfig.model_validate({"name": "s", "evaluations": [{"k": 5}, {"k": 5, "n": 100}]})


def test_a_validated_config_is_frozen_and_replace_makes_a_changed_copy():
    cfg = RunConfig.model_validate({"data": {"name": "static_shapes"}})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.threads = 2
    changed = replace(cfg, {"train.threads": 2, "train.checkpoint_dir": "ckpt"})
    assert (changed.train.threads, changed.train.checkpoint_dir) == (2, "ckpt")
    assert (cfg.train.threads, cfg.train.checkpoint_dir) == (None, None)
    assert changed.model == cfg.model and changed.data == cfg.data


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_every_none_is_filled_from_the_data_sets_column(name):
    """The one table (NEM_SPEC.md §3) is what a config resolves to; a set value wins over it."""
    cfg = RunConfig.model_validate({"data": {"name": name}})
    table = DEFAULTS[name] | NETWORK_DEFAULTS[cfg.model.network]
    resolved = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in table}
    assert resolved == table
    assert cfg.model.em_steps == (15 if name == "static_shapes" else 20)
    mine = RunConfig.model_validate({"data": {"name": name}, "model": {"hidden": 7, "w_inter": 0.5}})
    assert (mine.model.hidden, mine.model.w_inter, mine.train.lr) == (7, 0.5, cfg.train.lr)
