"""A service site that moves (a new disk, a restore onto another machine) carries on.

Real `gembatch serve` processes on a real emulator: jobs are left finished, waiting on
Gemini and not yet uploaded; the service stops; the data directory (and the SQLite
database with it) moves to another path, the old one gone; a service started at the new
place finishes every job, serves every result, and nothing it answers names a path on
the server. Also after `gembatch db restore` onto a new site, which checks that the data
directory that belongs with the database is there, and for a database written before
records held relative paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.server.process import ServiceProcess
from tests.server.conftest import inline_body as failing_body
from tests.server.reliability_helpers import (
    FAST_ENGINE,
    SERVICE_ARGS,
    Services,
    create_job,
    eventually,
    gembatch,
    inline_body,
    ledger_records,
    status_of,
    wait_all,
)

FAST_CLOCK = {"pending_seconds": 0.2, "running_seconds": 0.4}
# Long enough for the service to be stopped while the batch still waits on Gemini.
SLOW_CLOCK = {"pending_seconds": 3.0, "running_seconds": 0.4}
ONE_LIVE_BATCH = ("--max-live-batches", "1")


@pytest.fixture
def services(tmp_path: Path) -> Any:
    started = Services(tmp_path / "services")
    yield started
    started.close()


def _site(
    services: Services, emu: EmulatorProcess, workdir: Path, db_url: str | None = None
) -> ServiceProcess:
    """A service whose database (SQLite: `workdir/gembatch.db`, unless `db_url`) and data
    directory (`workdir/data`) live under `workdir`, started there."""
    env = {**emu.client_env(), "GEMBATCH_ENGINE": FAST_ENGINE}
    svc = ServiceProcess(workdir, env=env, args=[*SERVICE_ARGS, *ONE_LIVE_BATCH], db_url=db_url)
    services.started.append(svc)
    return svc.start()


def _jobs_in_every_state(emu: EmulatorProcess, svc: ServiceProcess) -> dict[str, str]:
    """Three jobs: `done` (completed, one request failed), `waiting` (its batch pending on
    Gemini) and `queued` (two tasks, nothing uploaded: the one live batch is taken). The
    service is stopped when this returns; the ledger is checked to say exactly that."""
    with svc.client() as client:
        done = create_job(client, failing_body(3, "done", failing=[2]))
        wait_all(svc, [done], timeout=30)
        emu.set_config({"clock": SLOW_CLOCK})
        waiting = create_job(client, inline_body(2, "waiting"))
        queued = create_job(client, {**inline_body(2, "queued"), "max_task_requests": 1})
        eventually(
            lambda: status_of(client, waiting)["current_step"] == "queued",
            what="the waiting job's batch pending on Gemini",
        )
    svc.stop()
    emu.set_config({"clock": FAST_CLOCK})
    records = ledger_records(svc.db_url, [done, waiting, queued])
    states = {job: [t["state"] for t in r["tasks"]] for job, r in records.items()}
    assert states == {done: ["done"], waiting: ["submitted"], queued: ["new", "new"]}, states
    return {"done": done, "waiting": waiting, "queued": queued}


def _everything_answered(
    svc: ServiceProcess,
    jobs: dict[str, str],
    routes: tuple[str, ...] = ("status", "events", "results"),
) -> str:
    """Every response body about these jobs: list, status, events (every event and audit
    entry), results."""
    bodies = []
    with svc.client() as client:
        bodies.append(client.get("/api/jobs").text)
        for job in jobs.values():
            for route in routes:
                response = client.get(f"/api/job/{job}/{route}")
                assert response.status_code == 200, (route, response.text)
                bodies.append(response.text)
    return "\n".join(bodies)


def _stored_records(db_url: str) -> str:
    from gembatch.ledger.sql import SqlLedger

    with SqlLedger(db_url) as ledger:
        return json.dumps(ledger.list_jobs(limit=1000))


def _assert_site_carries_on(
    svc: ServiceProcess, jobs: dict[str, str], tmp_path: Path, *, retry: bool = False
) -> None:
    """Every job finishes where the site is now (with `retry`, a retry of the finished
    job's failed request too: its requests are written beside its results); no answer
    and no stored record names a server path."""
    finished = wait_all(svc, jobs.values(), timeout=60)
    assert {name: finished[job]["status"] for name, job in jobs.items()} == {
        "done": "completed",
        "waiting": "completed",
        "queued": "completed",
    }
    if retry:
        with svc.client() as client:
            retried = client.post(
                "/job-operations",
                json={
                    "action": "updateBatchJob",
                    "data": {"job_id": jobs["done"], "status": "pending"},
                },
            )
            assert retried.status_code == 200, retried.text
        wait_all(svc, [jobs["done"]], timeout=60)
    with svc.client() as client:
        done = status_of(client, jobs["done"])
        assert done["status"] == "completed" and done["attempts"] >= (2 if retry else 1), done
        for name, count in (("done", 3), ("waiting", 2), ("queued", 2)):
            lines = client.get(f"/api/job/{jobs[name]}/results").text.splitlines()
            assert len(lines) == count, (name, lines)
    answered = _everything_answered(svc, jobs)
    stored = _stored_records(svc.db_url)
    for root in {str(tmp_path), str(tmp_path.resolve())}:
        assert root not in answered, answered
        assert root not in stored, stored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_moved_data_directory_finishes_every_job_and_names_no_server_path(
    backend: str, request: pytest.FixtureRequest, services: Services, tmp_path: Path
) -> None:
    """SQLite: the database moves with the data directory (`mv` of the whole site).
    PostgreSQL: the database stays, the data directory moves."""
    db_url = request.getfixturevalue("postgresql_url") if backend == "postgresql" else None
    emu = EmulatorProcess(state_dir=tmp_path / "emulator", config={"clock": FAST_CLOCK}).start()
    try:
        old, new = tmp_path / "site", tmp_path / "moved" / "site"
        jobs = _jobs_in_every_state(emu, _site(services, emu, old, db_url))
        new.parent.mkdir()
        # `db check` says what the database needs of a data directory that is not there.
        lacking = gembatch(
            "db", "check", "--db", db_url or f"sqlite:///{old / 'gembatch.db'}",
            "--data-dir", str(new / "data"), cwd=tmp_path,
        )  # fmt: skip
        assert lacking.returncode == 1, lacking.stdout + lacking.stderr
        assert "Traceback" not in lacking.stderr
        assert "(it does not exist)" in lacking.stderr, lacking.stderr
        for needed in (f"inputs/{jobs['queued']}.jsonl", f"results/{jobs['done']}.jsonl"):
            assert needed in lacking.stderr, lacking.stderr
        shutil.move(old, new)
        svc = _site(services, emu, new, db_url)
        checked = gembatch(
            "db", "check", "--db", svc.db_url, "--data-dir", str(new / "data"), cwd=tmp_path
        )
        assert checked.returncode == 0, checked.stderr
        _assert_site_carries_on(svc, jobs, tmp_path, retry=True)
        assert not old.exists()  # nothing was written to the old place
    finally:
        emu.close()


def test_an_input_lost_from_the_data_directory_fails_its_job_naming_it_inside(
    services: Services, tmp_path: Path
) -> None:
    clock = {"pending_seconds": 1.5, "running_seconds": 0.2}  # the lost job waits this long
    emu = EmulatorProcess(state_dir=tmp_path / "emulator", config={"clock": clock}).start()
    try:
        svc = _site(services, emu, tmp_path / "site")
        with svc.client() as client:
            create_job(client, inline_body(1, "blocker"))
            eventually(lambda: emu.stats()["batches_created"] == 1, what="the blocker's batch")
            # Behind the one live batch: its input is read only once the blocker is done.
            lost = create_job(client, inline_body(2, "lost"))
            source = svc.data_dir / "inputs" / f"{lost}.jsonl"
            kept = source.read_bytes()
            source.unlink()
            failed = wait_all(svc, [lost], timeout=60)[lost]
            answered = _everything_answered(svc, {"lost": lost}, routes=("status", "events"))
            assert failed["status"] == "failed", failed
            assert failed["error"].startswith(
                f"the input file inputs/{lost}.jsonl is missing: put it back"
            )
            assert failed["error_details"]["class"] == "LOCAL_IO"
            assert emu.stats()["uploads"] == 1  # the blocker's only: nothing was tried twice
            for root in {str(tmp_path), str(tmp_path.resolve())}:
                assert root not in answered, answered
            # What the message says to do works: put it back, retry the job.
            source.write_bytes(kept)
            retried = client.post(
                "/job-operations",
                json={"action": "updateBatchJob", "data": {"job_id": lost, "status": "pending"}},
            )
            assert retried.status_code == 200, retried.text
            assert wait_all(svc, [lost], timeout=60)[lost]["status"] == "completed"
            assert len(client.get(f"/api/job/{lost}/results").text.splitlines()) == 2
    finally:
        emu.close()


def test_db_restore_onto_a_new_machine_needs_the_data_directory_then_carries_on(
    services: Services, tmp_path: Path
) -> None:
    emu = EmulatorProcess(state_dir=tmp_path / "emulator", config={"clock": FAST_CLOCK}).start()
    try:
        old, new = tmp_path / "old-machine", tmp_path / "new-machine"
        svc = _site(services, emu, old)
        jobs = _jobs_in_every_state(emu, svc)
        backup = tmp_path / "backup" / "gembatch.db"
        backup.parent.mkdir()
        made = gembatch("db", "backup", str(backup), "--db", svc.db_url, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        shutil.copytree(old / "data", backup.parent / "data")  # the data directory's copy
        shutil.rmtree(old)  # the old machine is gone
        new.mkdir()
        restore = ("db", "restore", str(backup), "--db", "sqlite:///gembatch.db")

        refused = gembatch(*restore, "--data-dir", "data", cwd=new)
        assert refused.returncode != 0, refused.stdout
        assert "Traceback" not in refused.stderr, refused.stderr
        for needed in (
            f"job {jobs['queued']} (pending): inputs/{jobs['queued']}.jsonl (input of task 0)",
            f"job {jobs['done']} (completed): results/{jobs['done']}.jsonl (its results)",
            "A restore needs the database and the data directory backed up with it",
            "--allow-missing",
        ):
            assert needed in refused.stderr, refused.stderr
        # Nothing left behind but the (empty) lock file a server would take too.
        assert {p.name for p in new.iterdir()} <= {"gembatch.db.server.lock"}

        shutil.copytree(backup.parent / "data", new / "data")
        restored = gembatch(*restore, "--data-dir", "data", cwd=new)
        assert restored.returncode == 0, restored.stderr
        assert "data holds every file the restored jobs need" in restored.stdout
        svc = _site(services, emu, new)
        _assert_site_carries_on(svc, jobs, tmp_path)
        # Restored, the jobs in flight were reconciled, not created again.
        assert set(emu.stats()["creates_by_display_name"].values()) == {1}
    finally:
        emu.close()


def _as_written_before(db_url: str, data_dir: Path) -> None:
    """The database as gembatch wrote it before records held relative paths (schema
    version 4): inputs absolute and resolved; results, parts and retry inputs as given
    with `--data-dir data`, i.e. relative to the directory the service ran in."""
    import sqlalchemy as sa

    from gembatch.ledger import migrations as m

    real = data_dir.resolve()

    def written(path: str, resolved: bool) -> str:
        inside = Path(path).resolve().relative_to(real) if Path(path).is_absolute() else path
        return str(real / inside) if resolved else f"data/{inside}"

    engine = sa.create_engine(db_url)  # the tests' PostgreSQL URL names its driver
    with engine.begin() as conn:
        for job_id, record in conn.execute(sa.select(m.jobs.c.id, m.jobs.c.record)).all():
            record = {**record, "input_path": written(record["input_path"], True)}
            record["result_file"] = written(record["result_file"], False)
            conn.execute(m.jobs.update().where(m.jobs.c.id == job_id).values(record=record))
        for job_id, idx, task in conn.execute(
            sa.select(m.tasks.c.job_id, m.tasks.c.idx, m.tasks.c.record)
        ).all():
            retry_input = "/.gembatch/" in task["input"]["path"]
            task = {**task, "input": {**task["input"]}}
            task["input"]["path"] = written(task["input"]["path"], not retry_input)
            if task.get("part_file"):
                task["part_file"] = written(task["part_file"], False)
            conn.execute(
                m.tasks.update()
                .where(m.tasks.c.job_id == job_id, m.tasks.c.idx == idx)
                .values(record=task)
            )
        conn.execute(m.meta.update().where(m.meta.c.key == "schema_version").values(value="4"))
        stored = json.dumps([r for (r,) in conn.execute(sa.select(m.jobs.c.record))])
        assert str(real) in stored and '"data/results/' in stored, stored
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_written_with_absolute_paths_is_migrated_and_can_move(
    backend: str, request: pytest.FixtureRequest, services: Services, tmp_path: Path
) -> None:
    db_url = request.getfixturevalue("postgresql_url") if backend == "postgresql" else None
    emu = EmulatorProcess(state_dir=tmp_path / "emulator", config={"clock": FAST_CLOCK}).start()
    try:
        old, new = tmp_path / "site", tmp_path / "moved" / "site"
        svc = _site(services, emu, old, db_url)
        jobs = _jobs_in_every_state(emu, svc)
        _as_written_before(svc.db_url, svc.data_dir)
        new.parent.mkdir()
        shutil.move(old, new)
        svc = _site(services, emu, new, db_url)
        _assert_site_carries_on(svc, jobs, tmp_path)
        assert not old.exists()
    finally:
        emu.close()


def test_an_unusable_input_file_is_refused_without_naming_the_data_directory(
    services: Services, tmp_path: Path
) -> None:
    emu = EmulatorProcess(state_dir=tmp_path / "emulator", config={"clock": FAST_CLOCK}).start()
    try:
        svc = _site(services, emu, tmp_path / "site")
        (svc.data_dir / "sub").mkdir()
        with svc.client() as client:
            for name in ("a" * 300, "sub/" + "b" * 300 + ".jsonl"):
                response = client.post("/api/job/batch", json={"input_file": name})
                assert response.status_code == 400, response.text
                detail = response.json()["detail"]
                assert "File name too long" in detail, detail
                assert str(tmp_path) not in detail and str(tmp_path.resolve()) not in detail
                assert len(detail) < 400, detail
    finally:
        emu.close()
