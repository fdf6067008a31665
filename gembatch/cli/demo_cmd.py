"""`gembatch demo`: the whole batch flow offline, on the bundled examples."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer

from gembatch.cli.app import app
from gembatch.errors import UserError

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@app.command()
def demo(
    directory: Path = typer.Option(
        EXAMPLES_DIR, "--dir", help="Directory of request files (*.jsonl) to run."
    ),
) -> None:
    """Run the bundled examples through the built-in emulator and show the answers."""
    from rich.console import Console

    from gembatch.emulator.config import EmulatorConfig
    from gembatch.emulator.server import EmulatorThread
    from gembatch.gemini.client import make_client

    console = Console()
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise UserError(f"no *.jsonl request files in {directory}")
    config = EmulatorConfig()
    config.clock.pending_seconds, config.clock.running_seconds = 0.5, 2.0
    with (
        tempfile.TemporaryDirectory(prefix="gembatch-demo-") as state,
        EmulatorThread(Path(state), config) as emulator,
    ):
        if True:  # keeps the body's indentation; replaced by the engine-driven demo
            console.print(f"[bold]Built-in Gemini emulator[/] at {emulator.base_url}")
            client = make_client(api_key="demo-key", base_url=emulator.base_url)
            jobs = {}
            for path in files:
                uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
                batch = client.batches.create(
                    model="gemini-2.5-flash-lite",
                    src=uploaded.name,
                    config={"display_name": f"demo-{path.stem}"},
                )
                jobs[path] = batch.name
                console.print(f"submitted {path.name} -> {batch.name}")
            last: dict[Path, str] = {}
            while len(last) < len(jobs) or any(
                s not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED") for s in last.values()
            ):
                for path, name in jobs.items():
                    state_name = client.batches.get(name=name).state.name
                    if last.get(path) != state_name:
                        console.print(f"{path.name}: {state_name}")
                        last[path] = state_name
                time.sleep(0.3)
            for path, name in jobs.items():
                batch = client.batches.get(name=name)
                if batch.dest is None or not batch.dest.file_name:
                    console.print(f"[red]{path.name}: no results ({batch.state.name})[/]")
                    continue
                data = client.files.download(file=batch.dest.file_name)
                results = directory / "results"
                results.mkdir(exist_ok=True)
                (results / path.name).write_bytes(data)
                answers = {
                    json.loads(line)["key"]: json.loads(line) for line in data.decode().splitlines()
                }
                console.print(f"\n[bold]{path.name}[/] -> {results / path.name}")
                for line in path.read_text().splitlines():
                    key = json.loads(line)["key"]
                    answer = answers.get(key, {})
                    text = (
                        answer.get("response", {})
                        .get("candidates", [{}])[0]
                        .get("content", {})
                        .get("parts", [{}])[0]
                        .get("text", "")
                    )
                    console.print(f"  {key}: {text[:90]}")
