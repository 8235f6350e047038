"""`clsp eval knn|linear|audit|plots|report|all|study`: each command builds a frozen config and calls one function."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from clsp.errors import UserError

app = typer.Typer(help="Evaluate runs: kNN, linear probe, audit of positives, pictures, report.", no_args_is_help=True)

SOURCE_HELP = "labelled source: digits | parquet:PATH_OR_GLOB | folder:DIR | cifar10:DIR | cifar100:DIR"
PRESET_HELP = "embedded (fast 30-epoch probe, CPU) | paper (authors' 100-epoch probe)"
PROBE_FOR_PRESET = {"embedded": "fast", "paper": "paper"}


@contextmanager
def _user_errors():
    """Bad options and missing files become one clear `error:` line (UserError) instead of a traceback."""
    from eval.linear import BackboneChangedError

    try:
        yield
    except (ValueError, FileNotFoundError, BackboneChangedError) as error:
        raise UserError(str(error)) from None


def _eval_config(source: str, preset: str, probe_epochs: Optional[int], batch_size: int, device: str, *,
                 knn: bool = True, linear: bool = True):
    from dataclasses import replace

    from eval.linear import PROBE_PRESETS
    from eval.report import EvalConfig

    if preset not in PROBE_FOR_PRESET:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PROBE_FOR_PRESET)}")
    probe = PROBE_PRESETS[PROBE_FOR_PRESET[preset]]
    if probe_epochs is not None:  # keep the schedule's shape: decay at 60% and 80% of the epochs
        milestones = sorted({m for m in (int(0.6 * probe_epochs), int(0.8 * probe_epochs)) if m > 0})
        probe = replace(probe, epochs=probe_epochs, milestones=tuple(milestones))
    return EvalConfig(source=source, knn=knn, linear=linear, probe=probe, batch_size=batch_size, device=device)


def _echo_results(result: dict) -> None:
    if "knn" in result:
        typer.echo("kNN top-1 %: " + ", ".join(f"k={k} {v:.2f}" for k, v in result["knn"].items()) +
                   f"  (best k={result['knn_best_k']})")
    if "linear_top1" in result:
        typer.echo(f"linear top-1 %: {result['linear_top1']:.2f} (train {result['linear_train_top1']:.2f})")
    typer.echo(f"wrote {result['results_file']} in the run's eval/")


@app.command("knn")
def knn_command(run: Path = typer.Argument(..., help="training run directory (backbone.safetensors, config.json)"),
                source: str = typer.Option("digits", help=SOURCE_HELP),
                batch_size: int = typer.Option(256, help="images per forward pass"),
                device: str = typer.Option("cpu", help="cpu | cuda | auto")) -> None:
    """Weighted kNN (cosine, T 0.07, k in 5..200) of the run's backbone: train split as bank, test split as queries."""
    from eval.report import evaluate_run

    with _user_errors():
        _echo_results(evaluate_run(run, _eval_config(source, "embedded", None, batch_size, device, linear=False)))


@app.command("linear")
def linear_command(run: Path = typer.Argument(..., help="training run directory"),
                   source: str = typer.Option("digits", help=SOURCE_HELP),
                   preset: str = typer.Option("embedded", help=PRESET_HELP),
                   probe_epochs: Optional[int] = typer.Option(None, help="override the preset's probe epochs"),
                   batch_size: int = typer.Option(256, help="images per forward pass"),
                   device: str = typer.Option("cpu", help="cpu | cuda | auto")) -> None:
    """Linear probe on the frozen backbone; fails if the backbone's weights or BN statistics moved while probing."""
    from eval.report import evaluate_run

    with _user_errors():
        config = _eval_config(source, preset, probe_epochs, batch_size, device, knn=False)
        _echo_results(evaluate_run(run, config))


@app.command("audit")
def audit_command(shards: str = typer.Argument(..., help="shard directory (with manifest.json)"),
                  source: str = typer.Option(..., help=SOURCE_HELP + " (the data the shards were made from)"),
                  out: Path = typer.Option(..., help="directory for audit.json and audit.md"),
                  anchors: int = typer.Option(256, help="anchors sampled (by hashed id)"),
                  components: int = typer.Option(32, help="PCA components of the fixed pixel feature space")) -> None:
    """Class agreement, hardness and diversity of the synthetic positives beside nearest real neighbours."""
    from eval.audit import AuditConfig, audit_shards, write_audit

    with _user_errors():
        config = AuditConfig(max_anchors=anchors, pca_components=components)
        json_path, md_path = write_audit(audit_shards(shards, source, config), out)
    typer.echo(md_path.read_text())
    typer.echo(f"wrote {json_path} and {md_path}")


@app.command("plots")
def plots_command(run: Path = typer.Argument(..., help="training run directory"),
                  out: Path = typer.Option(..., help="directory for the PNGs")) -> None:
    """Loss terms and kNN monitor from log.csv; t-SNE of the test embeddings saved by `knn`/`linear`/`all`."""
    from eval.plots import plot_run

    with _user_errors():
        written = plot_run(run, out)
    if not written:
        raise UserError(f"{run} has neither log.csv nor eval/test_features.npy: train it and run `clsp eval knn` first")
    for path in written:
        typer.echo(f"wrote {path}")


@app.command("report")
def report_command(runs: list[Path] = typer.Argument(..., help="run directories that hold eval/results.json"),
                   out: Path = typer.Option(..., help="directory for report.md, results.csv and pictures")) -> None:
    """Compare runs: mean ± std over seeds by method, positives and lam, with a plain verdict per method."""
    from eval.report import report

    with _user_errors():
        summary = report(runs, out)
    typer.echo("\n".join(summary["verdicts"]))
    typer.echo(f"wrote {summary['report']} and {summary['csv']}")


@app.command("all")
def all_command(run: Path = typer.Argument(..., help="training run directory"),
                shards: str = typer.Option(..., help="the shard directory the run trained on"),
                source: str = typer.Option("digits", help=SOURCE_HELP),
                out: Path = typer.Option(..., help="report directory"),
                preset: str = typer.Option("embedded", help=PRESET_HELP),
                probe_epochs: Optional[int] = typer.Option(None, help="override the preset's probe epochs"),
                audit_anchors: int = typer.Option(256, help="anchors in the audit sample"),
                batch_size: int = typer.Option(256, help="images per forward pass"),
                device: str = typer.Option("cpu", help="cpu | cuda | auto")) -> None:
    """kNN + linear + audit + plots + contact sheet + report for one run (`make eval`)."""
    from eval.report import AllConfig, evaluate_all

    with _user_errors():
        config = AllConfig(str(run), shards, str(out), _eval_config(source, preset, probe_epochs, batch_size, device),
                           audit_anchors)
        summary = evaluate_all(config)
    _echo_results(summary["results"])
    typer.echo(Path(summary["audit_md"]).read_text())
    typer.echo(f"wrote {summary['report']}, {summary['csv']}, {summary['audit']}, {summary['sheet']}")


def _key_values(options: list[str]) -> tuple[tuple[str, object], ...]:
    """["epochs=20", "lr=0.1"] -> (("epochs", 20), ("lr", 0.1)); a value that is not JSON stays a string."""
    import json

    pairs = []
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--train-option {option!r} must look like KEY=VALUE, e.g. epochs=20")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        pairs.append((key.strip().replace("-", "_"), value))
    return tuple(pairs)


@app.command("study")
def study_command(shards: str = typer.Argument(..., help="shard directory to train every run on"),
                  source: str = typer.Option("digits", help=SOURCE_HELP),
                  out: Path = typer.Option(..., help="study directory (runs/ and the report go here)"),
                  methods: str = typer.Option("simclr,moco", help="comma-separated methods"),
                  positives: str = typer.Option("none,augment,synthetic", help="comma-separated kinds of positives"),
                  seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
                  preset: str = typer.Option("embedded", help="training and probe preset: " + PRESET_HELP),
                  train_option: Optional[list[str]] = typer.Option(
                      None, "--train-option", help="KEY=VALUE set on every training run (a `clsp train run` option, "
                      "JSON value), repeatable, e.g. --train-option epochs=20"),
                  probe_epochs: Optional[int] = typer.Option(None, help="override the preset's probe epochs"),
                  device: str = typer.Option("cpu", help="evaluation device: cpu | cuda | auto")) -> None:
    """Train and evaluate methods x positives x seeds, then report; rerun to resume (finished runs are skipped)."""
    from eval.report import StudyConfig, study

    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    with _user_errors():
        config = StudyConfig(shards, source, str(out), split(methods), split(positives),
                             tuple(int(s) for s in split(seeds)), "embedded" if preset == "embedded" else None,
                             train_options=_key_values(train_option or []),
                             eval=_eval_config(source, preset, probe_epochs, 256, device))
        summary = study(config)
    typer.echo("\n".join(summary["verdicts"]))
    typer.echo(f"wrote {summary['report']} ({len(summary['groups'])} groups)")
