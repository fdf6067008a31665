"""`gembatch demo`: the whole flow offline, on the bundled examples."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import typer

from gembatch.cli.app import Settings, app

EXAMPLES_DIR = (Path(__file__).resolve().parent.parent / "examples").resolve()


@app.command()
def demo(
    directory: Path = typer.Option(
        EXAMPLES_DIR,
        "--dir",
        metavar="DIR",
        help="Directory of request files (*.jsonl) to run.",
        show_default="the bundled examples",  # not this machine's install path
    ),
) -> None:
    """Submit the bundled examples to the built-in emulator, watch them, show the results.

    Works offline, with no API key: the emulator runs inside the command and its state
    goes away with it.
    """
    from gembatch.cli import common, flow
    from gembatch.errors import UserError
    from gembatch.results import summarize_usage

    files = sorted(str(p) for p in directory.glob("*.jsonl"))
    if not files:
        raise UserError(f"no *.jsonl request files in {directory}")
    with tempfile.TemporaryDirectory(prefix="gembatch-demo-") as work:
        opts = Settings(job_info=Path(work) / "job-info.jsonl", local=True, verbose=False)
        options = flow.SubmitOptions(model=common.model_name(None), force=True)
        poll_options = flow.PollOptions(interval=1.0)
        with common.local_emulator(opts) as url:
            print(f"gembatch demo: {len(files)} request files, built-in Gemini emulator at {url}")
            from gembatch.ledger.jsonl import JsonlLedger

            remote = common.make_remote()
            inputs = flow.validate(files, options)
            engine = flow.engine_for(JsonlLedger(opts.job_info), remote, poll_options, "demo")

            async def go() -> int:
                try:
                    submitted = await flow.submit(engine, inputs, options, sys.stdout)
                    await flow.poll(engine, poll_options, sys.stdout)
                finally:
                    await remote.aclose()
                return flow.outcome_code(engine, submitted.job_ids)

            code = common.run(go())
            jobs = engine.jobs()
    print("\nWhat was produced:")
    for job in jobs:
        if not job.result_file or not Path(job.result_file).exists():
            print(f"  {job.input_file}: no results ({job.status.value})")
            continue
        usage = summarize_usage(Path(job.result_file))
        counts = job.requests
        print(
            f"  {_relative(Path(job.result_file))}: {counts.succeeded}/{counts.total} answers, "
            f"{usage.get('totalTokenCount', 0):,} tokens"
        )
    print("Join answers to prompts: gembatch results examples/basic.jsonl --format csv")
    raise typer.Exit(code)


def _relative(path: Path) -> Path:
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
