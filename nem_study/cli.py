"""``nem-study``: the command line.

Every user-facing problem (bad config, missing file, damaged checkpoint) is an ``InputError``:
one message naming the field or file, exit code 2, no traceback. Any other exception is a bug:
one line ``nem-study: internal error: ...`` naming the file that holds its traceback, exit code 1
(``--debug`` or ``NEM_STUDY_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  nem-study train studies/runs/flying_shapes.yaml --set model.k=5 --set train.max_epochs=3
  nem-study evaluate runs/flying_shapes/best.pt --k 5 --objects 5 --steps 50
  nem-study data generate flying_mnist --mnist ~/data/mnist.npz
  nem-study data show flying_shapes --out strip.png
  nem-study validate studies/quickstart.yaml
  nem-study run studies/quickstart.yaml
  nem-study resume studies/quickstart.yaml
  nem-study report studies/quickstart.yaml --out reports/quickstart
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nem-study", description="Reproduce and stress-test Neural Expectation Maximization.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = ("on an internal error, show the Python traceback instead of writing it to a file "
                  "(also: NEM_STUDY_DEBUG=1)")
    p.add_argument("--debug", action="store_true", help=debug_help)
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command too
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mnist_help = "MNIST as .npz or a folder of IDX files (default: $NEM_MNIST, the cache, a download)"
    override_help = "override a config key, e.g. --set model.k=5 (repeatable)"

    t = sub.add_parser("train", parents=[debug], help="train one run from a config file",
                       description="Train N-EM / RNN-EM from one run config (YAML). Prints a progress "
                       "bar per epoch and ends with one JSON line of test metrics.")
    t.add_argument("config", help="run config YAML (examples in studies/runs/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=override_help)
    t.add_argument("--out", help="checkpoint folder (default: train.checkpoint_dir, else runs/<name>-<time>)")
    t.add_argument("--resume", metavar="CHECKPOINT", help="continue from this checkpoint (file or folder)")
    t.add_argument("--mnist", help=mnist_help)
    t.add_argument("--quiet", action="store_true", help="no progress output, only the final JSON line")

    e = sub.add_parser("evaluate", parents=[debug], help="evaluate a checkpoint, also with other K / objects / steps",
                       description="Evaluate a trained network on its test set, optionally with another "
                       "K, another object count, more time steps, or static images (NEM_SPEC.md §5). "
                       "Prints JSON.")
    e.add_argument("checkpoint", help="best.pt / last.pt, or the folder holding them (uses last.pt)")
    e.add_argument("--k", type=int, help="number of components at test time")
    e.add_argument("--objects", type=int, help="objects per image at test time")
    e.add_argument("--steps", type=int, help="EM steps / time steps (e.g. 50)")
    e.add_argument("--static", action="store_true", help="repeat each first frame for every step")
    e.add_argument("--n", type=int, help="number of test sequences (default: all)")
    e.add_argument("--average-method", default="max", choices=["max", "arithmetic", "min", "geometric"],
                   help="AMI normalisation (paper: max)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--panel", metavar="PNG", help="also draw the first test sequence's groupings "
                   "(input, each component's prediction, gamma, truth)")
    e.add_argument("--mnist", help=mnist_help)

    d = sub.add_parser("data", parents=[debug], help="generate or look at data sets",
                       description="Data sets are a pure function of their spec; they are cached as "
                       "Arrow files under $NEM_DATA_DIR (default: the user cache folder).")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, text in [("generate", "generate a data set into the cache (if absent)"),
                       ("show", "write a PNG strip of a few sequences with their label maps")]:
        a = dsub.add_parser(name, parents=[debug], help=text, description=text)
        a.add_argument("spec", metavar="NAME|SPEC.yaml",
                       help="static_shapes, flying_shapes, flying_mnist, or a YAML data spec / run config")
        a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec field, e.g. --set objects=5")
        a.add_argument("--mnist", help=mnist_help)
        if name == "generate":
            a.add_argument("--force", action="store_true", help="regenerate even if cached")
        else:
            a.add_argument("--split", default="train", choices=["train", "valid", "test"])
            a.add_argument("--out", help="PNG path (default: NAME-strip.png)")
            a.add_argument("--n", type=int, default=4, help="sequences to show")

    def study_arguments(p: argparse.ArgumentParser, study_help: str, ray: bool = True) -> None:
        """The study file and --set (validate, run, resume); with ``ray``, where trials run."""
        p.add_argument("study", help=study_help)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a study key, e.g. --set tracking.uri=http://mlflow:5000 --set "
                       "storage=/shared/ray_results (repeatable; resume needs the same ones)")
        if not ray:
            return
        p.add_argument("--address", metavar="auto|HOST:PORT",
                       help="an existing Ray cluster (default: start a local Ray)")
        p.add_argument("--num-cpus", type=int, metavar="N",
                       help="CPUs of the local Ray (default: $NEM_RAY_CPUS, else all)")
        p.add_argument("--num-gpus", type=int, metavar="N",
                       help="GPUs of the local Ray (default: the GPUs torch/Ray detect)")
        p.add_argument("--mnist", help=mnist_help + "; flying MNIST data are generated before any trial")

    v = sub.add_parser("validate", parents=[debug], help="check a study file and list its trials",
                       description="Check a study YAML (base run, grid, seeds, resources, tracking). "
                       "Reports every problem at once with its place in the YAML (exit 2), else the "
                       "trials it would launch.")
    study_arguments(v, "study YAML (see studies/)", ray=False)

    r = sub.add_parser("run", parents=[debug], help="run a study: its trials on Ray Tune, tracked in MLflow",
                       description="Run every trial of a study (grid cells x seeds) on Ray Tune, each "
                       "one an MLflow child run under one parent run per study. Checks the tracking "
                       "store first; ends with a summary (trials finished / failed, best test AMI "
                       "per grid cell).")
    study_arguments(r, "study YAML (see studies/)")
    r.add_argument("--dry-run", action="store_true", help="print the trials and exit")

    s = sub.add_parser("resume", parents=[debug], help="continue a study whose driver was interrupted",
                       description="Continue an interrupted `nem-study run` from its Ray Tune state in the "
                       "study's storage folder: finished trials stay, the others go on from their last "
                       "checkpoint, each in its own MLflow child run, under the study's latest parent run.")
    study_arguments(s, "the study YAML it was started with")

    c = sub.add_parser("config", parents=[debug], help="show the fully resolved config of a run or a study",
                       description="Print what would run, with every default of NEM_SPEC.md §3 filled in: "
                       "a run config as YAML; a study's resolved base, then each trial's differences from it.")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cs = csub.add_parser("show", parents=[debug], help="print the resolved config (nothing runs)",
                         description="Print the resolved run config of RUN.yaml, or for STUDY.yaml the "
                         "resolved base and, per trial, the keys where it differs from the base.")
    cs.add_argument("config", metavar="RUN.yaml|STUDY.yaml", help="a run config or a study file")
    cs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=override_help + " (for a study: study keys, e.g. --set base.model.k=5)")

    rp = sub.add_parser("report", parents=[debug], help="tables and figures of a study, from MLflow",
                        description="Read every trial of a study from MLflow and write its report: a table "
                        "of the grid (mean ± std over seeds, failed runs counted), the paper's tables where "
                        "the study has such runs (published values beside ours), figures (AMI per time "
                        "step, BCE K = 1 vs 5, training curves, grouping panels) and index.md. Also logs "
                        "the files on the study's parent run (artifacts under report/).")
    rp.add_argument("study", metavar="STUDY", help="a study YAML (its name and tracking section), a study "
                    "name, or the study's MLflow parent run id")
    rp.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: the YAML's "
                    "tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    rp.add_argument("--out", metavar="DIR", help="report folder (default: reports/<study>)")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from nem_study.config import replace
    from nem_study.config_files import load_run_config

    cfg = load_run_config(args.config, args.overrides)  # before torch is imported: a bad file answers at once

    from nem_study import data
    from nem_study.capacity import check_batch
    from nem_study.checkpoints import load_checkpoint
    from nem_study.data.store import check_space
    from nem_study.plots import training_curves
    from nem_study.curriculum import fit_curriculum

    check_batch(cfg)  # a batch or a data set that cannot fit: refused before anything is made
    check_space(cfg.data)
    if args.out or cfg.train.checkpoint_dir is None:
        out = args.out or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = replace(cfg, {"train.checkpoint_dir": out})
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    def load(spec, split):
        return data.load(spec, split, mnist_path=args.mnist)

    stages = f", curriculum {cfg.data.curriculum}" if cfg.data.curriculum else ""
    log(f"training {cfg.model.kind} K={cfg.model.k} on {cfg.data.name} ({cfg.data.train} sequences{stages}), "
        f"checkpoints in {cfg.train.checkpoint_dir}")
    history: list[dict] = []
    result = fit_curriculum(cfg, load, report=lambda m, _: history.append(m), resume=args.resume,
                            progress=not args.quiet)
    out = Path(cfg.train.checkpoint_dir)
    if not cfg.data.curriculum:  # the checkpoint's history also holds the epochs before a --resume
        history = load_checkpoint(out / "last.pt")["history"]
    (out / "metrics.json").write_text(json.dumps(result | {"history": history}, indent=1))
    training_curves(history, out / "curves.png", title=f"{cfg.model.kind} K={cfg.model.k} on {cfg.data.name}")
    log(f"test AMI {result['test_ami']:.3f} (mean over steps {result['test_ami_mean']:.3f}, "
        f"last step {result['test_ami_last']:.3f}; scored: {result['test_ami_score']}), "
        f"stopped by {result['stop_reason']} after {result['epochs']} epochs; metrics in {out / 'metrics.json'}, "
        f"curves in {out / 'curves.png'}")
    print(json.dumps(result))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nem_study.evaluate import generalisation

    result = generalisation(args.checkpoint, k=args.k, objects=args.objects, steps=args.steps,
                            static=args.static, n=args.n, mnist_path=args.mnist, device=args.device,
                            average_method=args.average_method, panel=args.panel)
    print(json.dumps(result))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from nem_study import data
    from nem_study.config_files import load_data_config

    spec = load_data_config(args.spec, args.overrides)
    if args.data_command == "generate":
        path = data.ensure(spec, mnist_path=args.mnist, force=args.force)
        print(path)
        return 0
    from nem_study.plots import data_strip

    split = data.load(spec, args.split, mnist_path=args.mnist)
    n = min(args.n, len(split))
    out = args.out or f"{spec.name}-strip.png"
    images, labels = split.batch(range(n))  # float in [0, 1], which data_strip takes
    data_strip(images, labels, out, n_seq=n,
               title=f"{spec.name}, {spec.objects} objects, {args.split} split")
    print(out)
    return 0


def print_trials(study_path: str, study, trials) -> None:
    from nem_study.study_config import cell_name

    if study.search is None:
        print(f"{study_path}: study {study.name!r}, {len(trials)} trial(s) "
              f"({len(trials) // study.seeds} grid cell(s) x {study.seeds} seed(s))")
    else:
        n = study.search.n_trials
        print(f"{study_path}: study {study.name!r}, {len(trials) * n} trial(s) ({len(trials)} grid cell(s) "
              f"x {n} sampled trial(s)); Optuna TPE over {', '.join(study.search.space)}, "
              f"{study.search.metric} ({study.search.mode}), seed {study.search.seed}")
    d = trials[0].config.data if trials else None
    if d is not None:
        print(f"  {d.name}, {d.train}/{d.valid}/{d.test} sequences, {d.frames} frame(s), "
              f"max {trials[0].config.train.max_epochs} epochs; {study.resources.cpu:g} CPU, "
              f"{study.resources.gpu:g} GPU per {'Ray trial' if study.ensemble else 'trial'}")
    if study.ensemble:
        print(f"  ensemble: the {study.seeds} seed(s) of each grid cell train together in one Ray trial "
              f"({len(trials) // study.seeds} Ray trial(s)), one MLflow child run per seed")
    if study.scheduler is not None:
        print(f"  ASHA on valid_loss: grace period {study.scheduler.grace_period} epoch(s), "
              f"reduction factor {study.scheduler.reduction_factor:g}")
    if study.evaluations and trials:
        print("  evaluations after training: " + ", ".join(e.label for e in study.evaluations))
    for t in trials:
        print(f"  {t.index:>4}  {t.name if study.search is None else cell_name(t.cell) or '(no grid)'}")


def cmd_config(args: argparse.Namespace) -> int:
    """``config show``: a run config resolved, or a study's base and each trial's differences."""
    import yaml

    from nem_study.config import flat
    from nem_study.config_files import load_run_config, read_yaml
    from nem_study.study_config import load_study_config
    from nem_study.trials import expand_trials

    if "name" not in read_yaml(args.config):   # a study has a name; a run config has none
        print(yaml.safe_dump(load_run_config(args.config, args.overrides).model_dump(mode="json"),
                             sort_keys=False), end="")
        return 0
    study = load_study_config(args.config, args.overrides)
    resolved = study.run_config({}, study.base.train.seed)
    base = flat(resolved)
    print(f"# study {study.name!r}: the resolved base run config")
    print(yaml.safe_dump({"base": resolved.model_dump(mode="json")}, sort_keys=False), end="")
    print("# each trial: the keys where it differs from the base")
    trials = {t.name: {k: v for k, v in flat(t.config).items() if v != base[k]} for t in expand_trials(study)}
    print(yaml.safe_dump({"trials": trials}, sort_keys=False), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from nem_study.study_config import load_study_config
    from nem_study.trials import expand_trials

    study = load_study_config(args.study, args.overrides)
    print_trials(args.study, study, expand_trials(study))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``run`` and ``resume``."""
    from nem_study.study_config import cell_name, load_study_config
    from nem_study.trials import expand_trials

    study = load_study_config(args.study, args.overrides)
    trials = expand_trials(study)
    print_trials(args.study, study, trials)
    if getattr(args, "dry_run", False):
        return 0
    from nem_study.capacity import check_data_sets
    from nem_study.data.store import data_dir, set_dir
    from nem_study.study import data_specs, run_study

    # Before Ray, MLflow or the cache are touched: what the study would generate, alone and together.
    check_data_sets([s for s in data_specs(study, trials) if not set_dir(s).is_dir()], data_dir())

    result = run_study(study, args.study, address=args.address, num_cpus=args.num_cpus,
                       num_gpus=args.num_gpus, mnist_path=args.mnist, resume=args.command == "resume")
    if result.interrupted:
        print(f"\nstudy {study.name!r} interrupted: {len(result.finished)} trial(s) finished, {len(result.failed)} failed "
              f"so far; Ray Tune saved its state. Continue with: nem-study resume {args.study}", file=sys.stderr)
        return 130
    stopped = f", {len(result.stopped)} stopped early by ASHA" if result.stopped else ""
    print(f"\nstudy {study.name!r}: {len(result.finished)} trial(s) finished, {len(result.failed)} failed{stopped} "
          f"(MLflow parent run {result.parent_run_id}, {study.tracking.uri}, experiment {study.experiment!r})")
    for name, error in result.failed.items():
        print(f"  failed  {name}: {error}")
    for cell, ami in sorted(result.best_test_ami.items()):
        print(f"  best test AMI {ami:.3f}  {cell_name(json.loads(cell)) or '(no grid)'}")
    print(json.dumps({"finished": len(result.finished), "failed": len(result.failed),
                      "stopped": len(result.stopped), "parent_run_id": result.parent_run_id}))
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import make_report   # no torch, no Ray: a report starts fast

    index = make_report(args.study, tracking_uri=args.tracking_uri, out=args.out)
    print(f"report written to {index.parent}/ (open {index})")
    return 0


DEBUG_ENV = "NEM_STUDY_DEBUG"
LOG_DIR_ENV = "NEM_STUDY_LOG_DIR"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (``InputError``, ``ReportError``): one line and exit code 2.
    Anything else is a bug: one line naming it and the file with its traceback, exit code 1
    (``--debug`` or ``NEM_STUDY_DEBUG=1``: the traceback itself, as Python prints it)."""
    from analysis import ReportError
    from nem_study.config import InputError

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    handler = {"train": cmd_train, "evaluate": cmd_evaluate, "data": cmd_data, "config": cmd_config,
               "validate": cmd_validate, "run": cmd_run, "resume": cmd_run, "report": cmd_report}[args.command]
    try:
        return handler(args)
    except (InputError, ReportError) as e:
        print(f"nem-study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nem-study: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`nem-study ... | head`): not a bug
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        return 141
    except Exception as e:
        train = sys.modules.get("nem_study.train")  # not imported: not a training error (and no torch import)
        if train is not None and isinstance(e, train.NonFiniteLoss):
            print(f"nem-study: training stopped: {e}", file=sys.stderr)
            return 1
        if debug:
            raise
        print(f"nem-study: internal error: {_one_line(e)} ({_save_traceback(e, argv)})", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _save_traceback(e: BaseException, argv: list[str] | None) -> str:
    """Write the traceback to ``$NEM_STUDY_LOG_DIR`` (else the temp folder); say where it went."""
    import tempfile
    import traceback

    folder = Path(os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir())
    text = (f"nem-study {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, Python {sys.version.split()[0]}\n\n"
            + "".join(traceback.format_exception(e)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"nem-study-crash-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as err:
        sys.stderr.write(text)
        return f"the traceback could not be written to {folder} ({err.strerror or err}), so it is above"
    return f"full traceback in {path}; rerun with --debug to see it here"


if __name__ == "__main__":
    sys.exit(main())
