"""``facejobs``: run, validate and demo jobs.

    facejobs run SPEC.yaml [--address ADDR]   run a job (local Ray by default)
    facejobs submit SPEC.yaml --address URL   run it on a cluster, through the Ray Jobs API
    facejobs status|logs|stop ID-or-SPEC      look after a submission; facejobs list: all of them
    facejobs validate SPEC.yaml               check a spec and its manifest
    facejobs train SPEC.yaml                  train a model with Ray Train
    facejobs report OUTPUT                    HTML contact sheet of an output folder
    facejobs demo [--output DIR]              an align job over sample photos
    facejobs rig-sheet [--out PNG]            random avatar renders beside their masks
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from facecore.rig.schema import SchemaError
from jobs.loopback import cluster_address
from jobs.manifest import ManifestError
from jobs.output import OutputError, RunSummary
from jobs.spec import SpecError, load_spec

log = logging.getLogger("facejobs")

EXIT_SPEC = 2
EXIT_FAILED = 1


def format_summary(summary: RunSummary) -> str:
    width = max([len(s) for s in summary.status_counts] + [10])
    lines = [
        f"{summary.kind} job finished in {summary.seconds:.1f} s -> {summary.output}",
        f"  input rows   {summary.input_rows}  (processed {summary.processed_rows}, "
        f"resumed {summary.resumed_rows})",
        f"  output rows  {summary.output_rows} in {summary.parts} parts",
    ]
    for status, count in summary.status_counts.items():
        lines.append(f"    {status:<{width}} {count}")
    if summary.duplicates_removed:
        lines.append(f"  duplicate rows removed: {summary.duplicates_removed}")
    if summary.extra_keys:
        lines.append(f"  warning: {summary.stale_rows} rows of {summary.extra_keys} keys that this manifest "
                     "lacks are in the output (left in place, not counted above)")
    for warning in summary.lineage.get("warnings", []):
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> int:
    from jobs.kinds import kind_of

    spec = load_spec(args.spec)
    kind = kind_of(spec)
    if not kind.runnable:
        print(f"{args.spec}: valid {spec.kind} job -> {spec.output.path}")
        return 0
    rows = kind.input_rows(spec)
    print(f"{args.spec}: valid {spec.kind} job, {rows.num_rows} input rows -> {spec.output.path}")
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM (``facejobs stop``, ``ray job stop``, a scheduler) ends the run through
    its ``finally`` blocks: the lease is released and the run's temporaries removed,
    so the next run need not wait out the lease."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.pipeline import run

    _exit_on_sigterm()
    spec = load_spec(args.spec)
    if spec.kind == "train":
        raise SpecError(f"{args.spec}: kind: train specs run with `facejobs train`")
    summary = run(spec, address=cluster_address(args.address), progress=not args.no_progress, verbose=args.verbose,
                  allow_spec_change=args.allow_spec_change)
    print(format_summary(summary))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs import submit

    run_args = ("--allow-spec-change",) if args.allow_spec_change else ()
    submitted = submit.submit(args.spec, args.address, run_args=run_args)
    if submitted.started:
        print(f"submitted {submitted.submission_id}")
    else:
        print(f"{submitted.submission_id} is already producing this output: not submitted again")
    if not args.wait:
        return 0
    client = submit.connect(args.address)
    state = _follow(client, submitted.submission_id)
    if not submitted.started:
        # A scheduled run that found the last one still going: its new rows are not
        # in that run's plan. Once it has ended, submit again (it resumes).
        print(f"{submitted.submission_id} ended {state.state}; submitting this run now")
        submitted = submit.submit(args.spec, args.address, run_args=run_args)
        print(("submitted " if submitted.started else "already running: ") + submitted.submission_id)
        state = _follow(client, submitted.submission_id)
    return 0 if state.state == "SUCCEEDED" else EXIT_FAILED


def _follow(client, submission_id: str):
    """Print a submission's logs as they come, until it ends; its final status."""
    import time

    from jobs import submit

    try:
        for chunk in submit.logs(client, submission_id, follow=True):
            print(chunk, end="", flush=True)
    except submit.SubmitError as exc:  # a broken stream (a tunnel hiccup): the job goes on; poll instead
        print(f"\nwarning: log stream ended ({exc}); waiting for the job's end", file=sys.stderr)
    while (state := submit.status(client, submission_id)).state not in submit.FINISHED:
        time.sleep(2)  # the log stream ends a moment before the state does
    print(_format_status(state))
    return state


def _format_status(state) -> str:
    lines = [f"{state.submission_id}: {state.state}" + (f" ({state.message})" if state.message else "")]
    if state.output:
        lines.append(f"  output    {state.output}")
    if state.rows_done is not None:
        lines.append(f"  rows      {state.progress}")  # "N/M rows (P%)  R rows/s  ETA ..." as the job printed it
    if state.output_rows is not None:
        lines.append(f"  finished  {state.output_rows} output rows in {state.parts} parts")
    return "\n".join(lines)


def _submission(args: argparse.Namespace):
    from jobs import submit

    client = submit.connect(args.address)
    return client, submit.resolve(client, args.target, submit.api_address(args.address))


def cmd_status(args: argparse.Namespace) -> int:
    from jobs import submit

    client, submission_id = _submission(args)
    print(_format_status(submit.status(client, submission_id)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from jobs import submit

    client, submission_id = _submission(args)
    for chunk in submit.logs(client, submission_id, follow=args.follow):
        print(chunk, end="", flush=True)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from jobs import submit

    client, submission_id = _submission(args)
    if submit.stop(client, submission_id):
        print(f"stopping {submission_id}; a later submit resumes from its committed rows")
    else:
        print(f"{submission_id} had already ended")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from datetime import datetime

    from jobs import submit

    def when(ms: int | None) -> str:
        return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"

    jobs = submit.submissions(submit.connect(args.address))
    print(f"{'SUBMISSION':<34} {'STATE':<10} {'KIND':<10} {'STARTED':<19} {'ENDED':<19} OUTPUT")
    for job in jobs:
        print(f"{job.submission_id:<34} {str(job.status):<10} {job.metadata.get('facejobs.kind', '?'):<10} "
              f"{when(job.start_time):<19} {when(job.end_time):<19} {job.metadata.get('facejobs.output', '')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jobs.spec import TrainJob
    from jobs.train import train

    spec = load_spec(args.spec)
    if not isinstance(spec, TrainJob):
        raise SpecError(f"{args.spec}: kind: `facejobs train` takes kind: train, got {spec.kind!r}")
    result = train(spec, address=cluster_address(args.address))
    metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in result["metrics"].items())
    print(f"trained {spec.model}: {metrics}\nmodel -> {result['model']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import write_report

    print(f"report -> {write_report(args.output, limit=args.limit)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    for spec_path, summary in run_demo(Path(args.output), progress=not args.no_progress):
        print(f"== {spec_path.stem}")
        print(format_summary(summary))
    return 0


def cmd_sample_photos(args: argparse.Namespace) -> int:
    from jobs.manifest import write_manifest
    from jobs.samples import copy_sample_photos

    folder = Path(args.folder).resolve()
    names = [path.name for path in copy_sample_photos(folder, exclude=tuple(args.exclude))]
    manifest = folder / "manifest.parquet"
    write_manifest(names, str(manifest))
    print(f"{len(names)} sample photos and their manifest -> {manifest}")
    return 0


def cmd_rig_sheet(args: argparse.Namespace) -> int:
    import numpy as np

    from facecore.images import encode_png, tile
    from facecore.rig import Renderer, colourise, default_schema, load_schema

    schema = load_schema(args.rig) if args.rig else default_schema()
    renderer = Renderer(schema)
    rng = np.random.default_rng(args.seed)
    cells = []
    for values in schema.sample(rng, args.count):
        render = renderer.render(values, args.size)
        cells.append(np.concatenate([render.image, colourise(render.mask)], axis=0))
    Path(args.out).write_bytes(encode_png(tile(cells, args.columns)))
    print(f"{args.count} random renders with their parsing masks -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facejobs", description="Batch face jobs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="run a job spec")
    run_parser.add_argument("spec", help="YAML or JSON job spec")
    run_parser.add_argument("--address", default=None,
                            help="Ray cluster address (default: start a local Ray)")
    run_parser.add_argument("--no-progress", action="store_true", help="hide the progress line")
    run_parser.add_argument("--allow-spec-change", action="store_true",
                            help="add rows to an output written with other options or models")
    run_parser.set_defaults(handler=cmd_run)

    address_help = "the cluster's Jobs API, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS)"
    submit_parser = commands.add_parser("submit", help="run a job spec on a Ray cluster (Ray Jobs API)")
    submit_parser.add_argument("spec", help="YAML or JSON job spec")
    submit_parser.add_argument("--address", default=None, help=address_help)
    submit_parser.add_argument("--wait", action="store_true",
                               help="stream the logs until it ends; exit 0 only if it succeeded")
    submit_parser.add_argument("--allow-spec-change", action="store_true", help="passed on to `facejobs run`")
    submit_parser.set_defaults(handler=cmd_submit)
    for name, handler, text in (("status", cmd_status, "state and rows so far of a submission"),
                                ("logs", cmd_logs, "a submission's logs"),
                                ("stop", cmd_stop, "stop a submission (a later submit resumes it)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("target", help="submission id, or the spec file (its output's newest submission)")
        sub.add_argument("--address", default=None, help=address_help)
        if name == "logs":
            sub.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
        sub.set_defaults(handler=handler)
    list_parser = commands.add_parser("list", help="facejobs submissions on the cluster")
    list_parser.add_argument("--address", default=None, help=address_help)
    list_parser.set_defaults(handler=cmd_list)

    train_parser = commands.add_parser("train", help="train a model (kind: train spec) with Ray Train")
    train_parser.add_argument("spec")
    train_parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    train_parser.set_defaults(handler=cmd_train)

    report_parser = commands.add_parser("report", help="write an HTML contact sheet into an output folder")
    report_parser.add_argument("output", help="a job's output folder")
    report_parser.add_argument("--limit", type=int, default=200, help="rows to show")
    report_parser.set_defaults(handler=cmd_report)

    validate_parser = commands.add_parser("validate", help="check a spec and its manifest")
    validate_parser.add_argument("spec")
    validate_parser.set_defaults(handler=cmd_validate)

    demo_parser = commands.add_parser("demo", help="run an align and a pinch job over sample photos")
    demo_parser.add_argument("--output", default="demo-output", help="folder for inputs and results")
    demo_parser.add_argument("--no-progress", action="store_true")
    demo_parser.set_defaults(handler=cmd_demo)

    samples_parser = commands.add_parser("sample-photos",
                                         help="copy the sample photos (fetched from PyPI) and a manifest into a folder")
    samples_parser.add_argument("folder")
    samples_parser.add_argument("--exclude", nargs="*", default=[], help="file names to leave out")
    samples_parser.set_defaults(handler=cmd_sample_photos)

    sheet_parser = commands.add_parser("rig-sheet", help="a contact sheet of random rig renders and masks")
    sheet_parser.add_argument("--out", default="rig_sheet.png", help="PNG file to write")
    sheet_parser.add_argument("--count", type=int, default=64)
    sheet_parser.add_argument("--columns", type=int, default=16)
    sheet_parser.add_argument("--size", type=int, default=128)
    sheet_parser.add_argument("--seed", type=int, default=0)
    sheet_parser.add_argument("--rig", default=None, help="rig schema YAML (default: built-in)")
    sheet_parser.set_defaults(handler=cmd_rig_sheet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "train", "demo") and not cluster_address(getattr(args, "address", None)):
        from jobs.loopback import keep_local_ray_on_loopback

        keep_local_ray_on_loopback()  # before anything imports ray: only for the Ray this command starts
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jobs.lease import LeaseHeld
    from jobs.lineage import SpecChanged
    from jobs.storage import StorageError
    from jobs.submit import SubmitError

    try:
        return args.handler(args)
    except (SpecError, ManifestError, SchemaError, SpecChanged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SPEC
    except (OutputError, FileNotFoundError, LeaseHeld, StorageError, SubmitError) as exc:
        # JobFailed is an OutputError: one line for a person; the traceback with --verbose.
        if args.verbose and not isinstance(exc, (LeaseHeld, FileNotFoundError)):
            log.exception("job failed")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
