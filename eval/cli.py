"""`clsp eval knn|linear|audit|plots|report|all|study|sweep`: each command builds a frozen config and calls one
function."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from clsp.errors import UserError
from clsp.vocabulary import DEVICE_HELP, FORWARD_BATCH_HELP, SPEC_HELP

app = typer.Typer(help="Evaluate runs: kNN, linear probe, audit of positives, pictures, report.", no_args_is_help=True)

SOURCE_HELP = f"labelled source: {SPEC_HELP}"
RUN_SOURCE_HELP = SOURCE_HELP + " (default: the source the run's shards were made from, as its config.json records)"
TEST_SOURCE_HELP = ("the test images as their own source, when --source holds no test split (e.g. "
                    "parquet:DIR/test-*.parquet); default: the test split of --source")
TRANSFER_HELP = "score on data other than the run's training data, on purpose (otherwise that is refused)"
PRESET_HELP = "embedded (fast 30-epoch probe, CPU) | paper (authors' 100-epoch probe)"
PROBE_FOR_PRESET = {"embedded": "fast", "paper": "paper"}


@contextmanager
def _user_errors():
    """Bad options and missing files become one clear `error:` line (UserError) instead of a traceback."""
    from clsp.eval.linear import BackboneChangedError

    try:
        yield
    except (ValueError, FileNotFoundError, BackboneChangedError) as error:
        raise UserError(str(error)) from None


def _check_out(out: Path, given=(), recorded=()) -> None:
    """An --out that is a file is refused before any work, and so is one inside a folder (or Parquet directory) that a
    source reads: what the command writes there would be added to the data (a new class folder, pictures read as
    images, another fingerprint), so that the next evaluation scores other data or refuses the run's own. Checked for
    every source the command is `given` and those its runs and shards were made from (`recorded`:
    clsp.sources.refuse_out_in_sources). Nor may it hold another stage's output (shards, a run)."""
    from clsp.run_dir import check_out_path, stage_output
    from clsp.sources import refuse_out_in_sources

    check_out_path(out)  # a file there: refused now, not after the features and the probe were computed
    held = stage_output(Path(out))
    if held:  # its reports and pictures would land among the files of shards others read, or of a run
        raise UserError(f"--out {out} holds {held}, and this command writes its results into a folder of its own: "
                        f"pass another --out")
    refuse_out_in_sources(out, given, recorded)


def _shards_source(shards: str) -> str | None:
    """The source spec the shards' manifest records (reading it raises the error the command itself would give)."""
    from clsp.shards.manifest import read_manifest

    return (read_manifest(shards).run.get("source") or {}).get("spec")


def _eval_config(source: Optional[str], preset: str, probe_epochs: Optional[int], batch_size: int, device: str, *,
                 test_source: Optional[str] = None, transfer: bool = False, knn: bool = True, linear: bool = True):
    from dataclasses import replace

    from clsp.eval.linear import PROBE_PRESETS
    from clsp.eval.evaluate import EvalConfig

    if preset not in PROBE_FOR_PRESET:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PROBE_FOR_PRESET)}")
    probe = PROBE_PRESETS[PROBE_FOR_PRESET[preset]]
    if probe_epochs is not None:  # keep the schedule's shape: decay at 60% and 80% of the epochs
        milestones = sorted({m for m in (int(0.6 * probe_epochs), int(0.8 * probe_epochs)) if m > 0})
        probe = replace(probe, epochs=probe_epochs, milestones=tuple(milestones))
    return EvalConfig(source=source, test_source=test_source, transfer=transfer, knn=knn, linear=linear, probe=probe,
                      batch_size=batch_size, device=device)


def _echo_results(result: dict, run: Path) -> None:
    if "knn" in result:
        typer.echo("kNN top-1 %: " + ", ".join(f"k={k} {v:.2f}" for k, v in result["knn"].items()) +
                   f"  (best k={result['knn_best_k']})")
    if "linear_top1" in result:
        typer.echo(f"linear top-1 %: {result['linear_top1']:.2f} (train {result['linear_train_top1']:.2f})")
    typer.echo(f"wrote {Path(run) / 'eval' / result['results_file']}")


@app.command("knn")
def knn_command(run: Path = typer.Argument(..., help="training run directory (backbone.safetensors, config.json)"),
                source: Optional[str] = typer.Option(None, help=RUN_SOURCE_HELP),
                test_source: Optional[str] = typer.Option(None, help=TEST_SOURCE_HELP),
                transfer: bool = typer.Option(False, "--transfer", help=TRANSFER_HELP),
                forward_batch: int = typer.Option(256, help=FORWARD_BATCH_HELP),
                device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Weighted kNN (cosine, T 0.07, k in 5..200) of the run's backbone: train split as bank, test split as queries."""
    from clsp.eval.evaluate import evaluate_run

    with _user_errors():
        config = _eval_config(source, "embedded", None, forward_batch, device, test_source=test_source,
                              transfer=transfer, linear=False)
        _echo_results(evaluate_run(run, config), run)


@app.command("linear")
def linear_command(run: Path = typer.Argument(..., help="training run directory"),
                   source: Optional[str] = typer.Option(None, help=RUN_SOURCE_HELP),
                   test_source: Optional[str] = typer.Option(None, help=TEST_SOURCE_HELP),
                   transfer: bool = typer.Option(False, "--transfer", help=TRANSFER_HELP),
                   preset: str = typer.Option("embedded", help=PRESET_HELP),
                   probe_epochs: Optional[int] = typer.Option(None, help="override the preset's probe epochs"),
                   forward_batch: int = typer.Option(256, help=FORWARD_BATCH_HELP),
                   device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Linear probe on the frozen backbone; fails if the backbone's weights or BN statistics moved while probing."""
    from clsp.eval.evaluate import evaluate_run

    with _user_errors():
        config = _eval_config(source, preset, probe_epochs, forward_batch, device, test_source=test_source,
                              transfer=transfer, knn=False)
        _echo_results(evaluate_run(run, config), run)


@app.command("audit")
def audit_command(shards: str = typer.Argument(..., help="shard directory (with manifest.json)"),
                  source: str = typer.Option(..., help=SOURCE_HELP + " (the data the shards were made from)"),
                  out: Path = typer.Option(..., help="directory for audit.json and audit.md"),
                  anchors: int = typer.Option(256, help="anchors sampled (by hashed id)"),
                  components: int = typer.Option(32, help="PCA components of the fixed pixel feature space")) -> None:
    """Class agreement, hardness and diversity of the synthetic positives beside nearest real neighbours."""
    from clsp.eval.audit import AuditConfig, audit_shards, write_audit

    with _user_errors():
        config = AuditConfig(max_anchors=anchors, pca_components=components)
        _check_out(out, [source], [_shards_source(shards)])
        json_path, md_path = write_audit(audit_shards(shards, source, config), out)
    typer.echo(md_path.read_text())
    typer.echo(f"wrote {json_path} and {md_path}")


@app.command("plots")
def plots_command(run: Path = typer.Argument(..., help="training run directory"),
                  out: Path = typer.Option(..., help="directory for the PNGs")) -> None:
    """Loss terms and kNN monitor from log.csv; t-SNE of the test embeddings saved by `knn`/`linear`/`all`."""
    from clsp.eval.plots import plot_run
    from clsp.eval.results import run_sources

    with _user_errors():
        _check_out(out, recorded=run_sources(run))
        written = plot_run(run, out)
    if not written:
        raise UserError(f"{run} has neither log.csv nor an evaluation of its current weights: train it and run "
                        f"`clsp eval knn {run}` first")
    for path in written:
        typer.echo(f"wrote {path}")


@app.command("report")
def report_command(runs: list[Path] = typer.Argument(..., help="run directories that hold eval/results.json"),
                   out: Path = typer.Option(..., help="directory for report.md, results.csv and pictures")) -> None:
    """Compare runs: mean ± std over seeds by method, positives and lam, with a plain verdict per method."""
    from clsp.eval.report import report
    from clsp.eval.results import run_sources

    with _user_errors():
        _check_out(out, recorded=[spec for run in runs for spec in run_sources(run)])
        summary = report(runs, out)
    typer.echo("\n".join(summary["verdicts"]))
    typer.echo(f"wrote {summary['report']} and {summary['csv']}")


@app.command("all")
def all_command(run: Path = typer.Argument(..., help="training run directory"),
                shards: str = typer.Option(..., help="the shard directory the run trained on"),
                source: Optional[str] = typer.Option(None, help=RUN_SOURCE_HELP),
                test_source: Optional[str] = typer.Option(None, help=TEST_SOURCE_HELP),
                transfer: bool = typer.Option(False, "--transfer", help=TRANSFER_HELP),
                out: Path = typer.Option(..., help="report directory"),
                preset: str = typer.Option("embedded", help=PRESET_HELP),
                probe_epochs: Optional[int] = typer.Option(None, help="override the preset's probe epochs"),
                audit_anchors: int = typer.Option(256, help="anchors in the audit sample"),
                forward_batch: int = typer.Option(256, help=FORWARD_BATCH_HELP),
                device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """kNN + linear + audit + plots + contact sheet + report for one run (`make eval`)."""
    from clsp.eval.evaluate_all import AllConfig, evaluate_all
    from clsp.eval.results import run_sources

    with _user_errors():
        eval_config = _eval_config(source, preset, probe_epochs, forward_batch, device, test_source=test_source,
                                   transfer=transfer)
        # evaluate_all refuses an --out inside the sources it scores on; the run's own and the shards' also matter
        _check_out(out, recorded=[*run_sources(run), _shards_source(shards)])
        config = AllConfig(str(run), shards, str(out), eval_config, audit_anchors)
        summary = evaluate_all(config)
    _echo_results(summary["results"], run)
    typer.echo(Path(summary["audit_md"]).read_text())
    typer.echo(f"wrote {summary['report']} (with its plots and pictures/), {summary['csv']}, {summary['audit']}, "
               f"{summary['audit_md']}, {summary['sheet']}")


def _key_values(options: list[str]) -> tuple[tuple[str, object], ...]:
    """["epochs=20", "lr=0.1", "cache=False"] -> (("epochs", 20), ("lr", 0.1), ("cache", False)): JSON, or Python's
    spelling of True, False and None; any other value stays a string (TrainConfig checks each option's type)."""
    import json

    python = {"True": True, "False": False, "None": None}
    pairs = []
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--train-option {option!r} must look like KEY=VALUE, e.g. epochs=20")
        try:
            value = python[text.strip()] if text.strip() in python else json.loads(text)
        except ValueError:
            value = text
        pairs.append((key.strip().replace("-", "_"), value))
    return tuple(pairs)


@app.command("study")
def study_command(shards: str = typer.Argument(..., help="shard directory to train every run on"),
                  source: Optional[str] = typer.Option(None, help=SOURCE_HELP + " (default: the source the "
                                                       "shards were made from); every labelled image of it (train "
                                                       "and test) is scored, by k-fold"),
                  transfer: bool = typer.Option(False, "--transfer", help=TRANSFER_HELP),
                  out: Path = typer.Option(..., help="study directory (runs/ and the report go here)"),
                  methods: str = typer.Option("simclr", help="comma-separated methods, e.g. simclr,moco (each "
                                              "adds its modes x seeds runs)"),
                  positives: str = typer.Option("none,augment,synthetic", help="comma-separated kinds of positives"),
                  seeds: str = typer.Option("0,1,2,3,4", help="comma-separated seeds"),
                  folds: int = typer.Option(5, help="folds of the k-fold scoring over all labelled images"),
                  preset: str = typer.Option("embedded", help="embedded (the embedded training preset, fast 30-epoch "
                                             "probe) | paper (`clsp train run`'s defaults, set the schedule with "
                                             "--train-option; the authors' 100-epoch probe)"),
                  train_option: Optional[list[str]] = typer.Option(
                      None, "--train-option", help="KEY=VALUE set on every training run (a `clsp train run` option, "
                      "JSON value), repeatable, e.g. --train-option epochs=20"),
                  probe_epochs: Optional[int] = typer.Option(None, help="override the preset's probe epochs"),
                  jobs: int = typer.Option(1, help="runs trained at once, each in its own process on cores/jobs "
                                           "threads (2 on a 2-core machine: about 1.8x faster for small networks)"),
                  device: str = typer.Option("auto", help="evaluation device: " + DEVICE_HELP)) -> None:
    """Train methods x positives x seeds, score each by k-fold over every labelled image, report paired differences
    with 95 % intervals; rerun to resume (finished runs are skipped)."""
    from clsp.study import StudyConfig, study

    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    with _user_errors():
        try:
            seed_values = tuple(int(s) for s in split(seeds))
        except ValueError:
            raise UserError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2,3,4") from None
        _check_out(out, [source], [_shards_source(shards)])  # the study's runs, reports and pictures go there
        config = StudyConfig(shards, source, str(out), split(methods), split(positives), seed_values, folds,
                             "embedded" if preset == "embedded" else None,
                             train_options=_key_values(train_option or []), jobs=jobs,
                             eval=_eval_config(source, preset, probe_epochs, 256, device, transfer=transfer))
        summary = study(config)
    typer.echo("\n".join(summary["verdicts"]))
    typer.echo(f"wrote {summary['report']} ({len(summary['groups'])} groups)")


@app.command("sweep")
def sweep_command(target: str = typer.Argument(..., help="shard directory (then pass --model) or a generator"),
                  out: Path = typer.Option(..., help="directory for sweep.json, sweep.csv, sweep.md and sweep.png"),
                  model: Optional[str] = typer.Option(None, help="the generator that made the shards, when TARGET "
                                                      "is a shard directory"),
                  source: Optional[str] = typer.Option(None, help=SOURCE_HELP + "; default: the shards' source, or "
                                                       "the one in the generator's card"),
                  w: str = typer.Option("0,0.05,0.1,0.2,0.5,1", help="comma-separated w values (1 = plain DDIM)"),
                  steps: str = typer.Option("20,100", help="comma-separated DDIM step counts"),
                  anchors: int = typer.Option(64, help="anchors sampled (by hashed id, as the audit picks them)"),
                  k: Optional[int] = typer.Option(None, help="positives per anchor and setting; default: the "
                                                  "shards' K, else 4"),
                  eta: Optional[float] = typer.Option(None, help="DDIM eta; default: the shards', else 0.1"),
                  seed: Optional[int] = typer.Option(None, help="anchor sample and noise; default: the shards', "
                                                     "else 0"),
                  components: int = typer.Option(32, help="PCA components of the fixed pixel feature space"),
                  forward_batch: int = typer.Option(256, help=FORWARD_BATCH_HELP + "; a row is one candidate of "
                                                    "one anchor"),
                  device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Class agreement against hardness of the positives at each (w, steps): pick w by measurement."""
    from clsp.eval.sweep import SweepConfig, numbers, run_sweep

    from clsp.run_dir import check_out_path

    with _user_errors():
        check_out_path(out)
        config = SweepConfig(target, str(out), model, source, numbers(w, float, "--w"), numbers(steps, int, "--steps"),
                             anchors, k, eta, seed, components, forward_batch, device)
        written = run_sweep(config)
    typer.echo(written["md"].read_text())
    typer.echo(f"wrote {written['json']}, {written['csv']}, {written['md']} and {written['png']}")
