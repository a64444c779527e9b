"""The cluster of docker/compose.yaml, natively on this machine (no Docker engine runs here).

PostgreSQL (the distribution's server, on loopback) is the backend store of an MLflow server
that proxies artifacts into a folder; a Ray head and a second Ray node (`ray start`, one CPU
each) form the cluster; a tiny study (two one-CPU trials) is submitted with `ray job submit`,
as docker/README.md does. Then: the trials ran on both nodes, every run is in PostgreSQL with
its artifacts in the server's artifact folder, and the MLflow UI (headless Chromium) lists the
trial runs under the study's parent run; the screenshot is kept in test-artifacts/.

The same submission also loses a node: once the trial on the second node has checkpointed
twice, that node's processes are all SIGKILLed (a machine dying). Ray declares the node dead,
Ray Tune restarts the trial (``max_failures``) on the head from its last checkpoint in the
shared storage, and the trial's MLflow child run carries on: one run per trial, FINISHED, each
epoch logged once.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from services import free_port, http_ok

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "test-artifacts"
STUDY = "native-cluster"
TRIALS = ["k=2,seed=0", "k=3,seed=0"]
EPOCHS = 8  # a few seconds per trial: the second node dies after its trial's second epoch
# Tune sees the trial fail at once (its connection to the actor is reset), but Ray schedules on
# the node's CPU until the GCS declares it dead: after this many failed health checks this far
# apart (Ray's defaults: 5, 3 s). A killed raylet fails each check at once.
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _pg_bin() -> Path | None:
    """The folder of the PostgreSQL server programs (initdb, pg_ctl)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _descendants(pid: int) -> list[int]:
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate these processes and everything they started (only those: no `ray stop`)."""
    pids = set()
    for p in procs:  # all of them first: children outlive a killed parent
        pids.update(_descendants(p.pid))
        if p.poll() is None:
            pids.add(p.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in procs) and not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return


def _kill_node(proc: subprocess.Popen) -> set[int]:
    """SIGKILL a `ray start --block` process and every process of its node, as if the machine died.

    The tree is frozen first (SIGSTOP, until no new process appears) so that nothing it starts
    in the meantime escapes; returns the pids killed.
    """
    frozen: set[int] = set()
    while new := {proc.pid, *_descendants(proc.pid)} - frozen:
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= new
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)
    return frozen


def _checkpoints(trial_dir: Path) -> list[int]:
    """The indices of the Tune checkpoints persisted in a trial's folder of the shared storage."""
    return sorted(int(c.name.rpartition("_")[2]) for c in trial_dir.glob("checkpoint_*") if c.is_dir())


def _wait(what: str, ready, timeout: float, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"{what} not ready after {timeout:.0f} s\n{tails}")


@pytest.fixture(scope="module")
def cluster():
    """PostgreSQL, MLflow, a two-node Ray cluster, and the study submitted to it (once)."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("the PostgreSQL server is not installed (Debian: apt-get install postgresql)")
    for module, package in [("psycopg2", "psycopg2-binary"), ("aiohttp_cors", "ray[default]")]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{package} is not installed (it is in the test extra)")
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        as_postgres = ["runuser", "-u", "postgres", "--"]

    root = Path(tempfile.mkdtemp(prefix="nem-nc-"))  # short: Ray's socket paths live below it
    root.chmod(0o755)  # the postgres user reaches its folders in here
    pg_data, pg_sock = root / "pg", root / "pg-socket"
    shared = root / "shared"  # "shared storage": every node is on this machine
    for folder in (pg_data, pg_sock, shared / "data", shared / "ray_results", root / "mlartifacts", root / "job"):
        folder.mkdir(parents=True)
    if as_postgres:
        shutil.chown(pg_data, "postgres")
        shutil.chown(pg_sock, "postgres")
    pg_port, mlflow_port, gcs_port, dashboard_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", NEM_DATA_DIR=str(shared / "data"),
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}", **HEALTH_CHECK)
    logs = {name: root / f"{name}.log" for name in ("mlflow", "ray-head", "ray-worker", "job")}
    logs["postgres"] = pg_sock / "postgres.log"  # written by the postgres user
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
        procs.append(proc)
        return proc

    def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
        assert out.returncode == 0, f"{argv}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        return out

    pg_started = False
    try:
        # PostgreSQL on loopback, trusting local connections (the test's own throwaway server).
        run([*as_postgres, str(pg_bin / "initdb"), "-D", str(pg_data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-locale"])
        run([*as_postgres, str(pg_bin / "pg_ctl"), "-D", str(pg_data), "-l", str(logs["postgres"]), "-w", "-t", "60",
             "-o", f"-h 127.0.0.1 -p {pg_port} -k {pg_sock}", "start"])
        pg_started = True
        run(["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-c", "CREATE DATABASE mlflow"])
        backend = f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/mlflow"

        # The MLflow server of compose.yaml: PostgreSQL backend store, artifacts proxied.
        start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
                         "--artifacts-destination", str(root / "mlartifacts"), "--serve-artifacts",
                         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"])
        _wait("the MLflow server", lambda: http_ok(f"http://127.0.0.1:{mlflow_port}/health"), 240,
              [logs["mlflow"]])

        # A Ray head and a second node, one CPU each. On one machine they need their own agent
        # ports and temp dirs (each node's runtime-env agent unpacks the job's working dir there).
        common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                  "--object-store-memory=100000000", "--disable-usage-stats"]
        start("ray-head", [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
                           f"--ray-client-server-port={free_port()}", f"--temp-dir={root / 'r0'}", *common])
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait("the Ray head", lambda: http_ok(f"{dashboard}/api/version"), 240, [logs["ray-head"]])
        worker = start("ray-worker", [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs_port}",
                                      f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={root / 'r1'}",
                                      *common])
        from ray.util.state import list_actors, list_nodes

        _wait("the second Ray node",
              lambda: len(list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])) == 2, 240,
              [logs["ray-head"], logs["ray-worker"]])

        # The study, submitted as docker/README.md says (tracking = the server, storage shared).
        (root / "job" / "study.yaml").write_text(f"""
name: {STUDY}
base:
  data: {{name: static_shapes, train: 384, valid: 16, test: 16}}
  model: {{em_steps: 3}}
  train: {{batch_size: 16, valid_samples: 16, patience: 1000}}
grid:
  model.k: [2, 3]
seeds: 1
resources: {{cpu: 1, gpu: 0}}
stop: {{max_epochs: {EPOCHS}}}
tracking: {{uri: "http://127.0.0.1:{mlflow_port}", artifact_location: "mlflow-artifacts:///{STUDY}"}}
storage: {shared / 'ray_results'}
max_failures: 1
""")
        argv = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(root / "job"),
                "--", "nem-study", "run", "study.yaml", "--address", "auto"]
        submit = start("job", argv)

        # The second node dies mid-trial: once the trial running there (its working folder is in
        # that node's temp dir) has persisted its second checkpoint, so that the restart has a
        # checkpoint past epoch 1 to go on from.
        experiment = shared / "ray_results" / STUDY
        killed: dict = {}
        deadline = time.time() + 600
        while submit.poll() is None and time.time() < deadline:
            on_worker = [d.name for d in (root / "r1").glob(f"session_*/artifacts/*/{STUDY}/working_dirs/*")]
            if on_worker and max(_checkpoints(experiment / on_worker[0]), default=-1) >= 1:
                checkpoints = _checkpoints(experiment / on_worker[0])
                killed = {"trial_dir": on_worker[0], "checkpoints": checkpoints, "at": time.time(),
                          "pids": _kill_node(worker)}
                break
            time.sleep(0.2)
        try:
            submit.wait(max(1.0, deadline + 300 - time.time()))
        except subprocess.TimeoutExpired:
            pass
        # The trial actors, dead ones included (their class is Tune's wrap_function.<locals>.ImplicitFunc).
        trial_actors = [a for a in list_actors(address=dashboard) if a.class_name.endswith("ImplicitFunc")]
        if killed:
            print(f"killed the second node {time.time() - killed['at']:.0f} s before the study ended, "
                  f"trial {killed['trial_dir']} at its checkpoints {killed['checkpoints']}")
        job = subprocess.CompletedProcess(argv, submit.returncode, logs["job"].read_text(errors="replace"), "")
        if job.returncode is None:
            job.returncode, job.stderr = -1, "ray job submit did not end in time"
        yield {"job": job, "killed": killed, "trial_actors": trial_actors, "dashboard": dashboard,
               "mlflow": f"http://127.0.0.1:{mlflow_port}",
               "pg": dict(host="127.0.0.1", port=pg_port, user="postgres", dbname="mlflow"),
               "artifacts": root / "mlartifacts", "experiment": experiment, "temp_dirs": [root / "r0", root / "r1"],
               "logs": logs}
    finally:
        _stop(procs[::-1])  # the job's client, the worker (if still there), the head, then MLflow
        if pg_started:
            subprocess.run([*as_postgres, str(pg_bin / "pg_ctl"), "-D", str(pg_data), "-m", "fast", "-w", "stop"],
                           capture_output=True, env=env, cwd=root, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _study_runs(cluster):
    import mlflow

    client = mlflow.MlflowClient(cluster["mlflow"])
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("nem_study.kind") == "study")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return client, experiment, parent, children


def test_the_submitted_study_runs_its_trials_on_both_nodes(cluster):
    job = cluster["job"]
    assert job.returncode == 0, (job.stdout + job.stderr)[-6000:]
    summary = json.loads(next(line for line in job.stdout.splitlines()[::-1] if line.startswith('{"finished"')))
    assert summary["finished"] == len(TRIALS) and summary["failed"] == 0

    from ray.util.state import list_nodes

    nodes = {n.node_id: n.is_head_node for n in list_nodes(address=cluster["dashboard"])}
    # One actor per node for the two trials. The restart of the trial whose node died gets a new
    # actor on the head, or (reuse_actors) the head's actor once its own trial is done.
    trial_actors = cluster["trial_actors"]
    assert len(trial_actors) in (2, 3) and {a.node_id for a in trial_actors} == set(nodes), (trial_actors, nodes)


def test_a_trial_whose_node_died_resumed_on_the_head_from_its_checkpoint(cluster):
    from ray.util.state import list_nodes

    killed = cluster["killed"]
    assert killed, ("the second node was not killed: the study ended before its trial had two checkpoints\n"
                    + (cluster["job"].stdout + cluster["job"].stderr)[-4000:])
    job = cluster["job"]
    assert job.returncode == 0, (job.stdout + job.stderr)[-6000:]
    nodes = {n.node_id: n for n in list_nodes(address=cluster["dashboard"])}
    head = next(i for i, n in nodes.items() if n.is_head_node)
    worker = next(i for i, n in nodes.items() if not n.is_head_node)
    assert nodes[worker].state == "DEAD" and nodes[head].state == "ALIVE", nodes

    # Tune's results of the trial (its result.json in the shared storage). The last process, on
    # the head, went on from a checkpoint persisted when the node died (checkpoint_00000i holds
    # epoch i + 1), not from scratch, to the last epoch. The rows of the first process, on the
    # killed node, are there only when the driver wrote them before the node died: under load
    # none or not all of them may be (seen: none; epoch 1 only, with the restart at epoch 3).
    trial_dir = cluster["experiment"] / killed["trial_dir"]
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    assert "outcomes" in rows[-1], rows[-1]  # the trial's last result is its outcome, after the epochs
    rows = rows[:-1]
    runs: list[tuple[int, list[int]]] = []  # (pid, its epochs), in order
    for row in rows:
        if not runs or runs[-1][0] != row["pid"]:
            runs.append((row["pid"], []))
        runs[-1][1].append(int(row["epoch"]))
    assert 1 <= len(runs) <= 2, runs
    *earlier, (after_pid, after) = runs
    assert 2 <= after[0] <= max(killed["checkpoints"]) + 2 and after == list(range(after[0], EPOCHS + 1)), runs
    actors = {a.pid: a.node_id for a in cluster["trial_actors"]}
    assert after_pid not in killed["pids"] and actors.get(after_pid) == head, (actors, runs, head, worker)
    for before_pid, before in earlier:
        assert before_pid in killed["pids"] and actors.get(before_pid) == worker, (actors, runs, killed)
        assert before == list(range(1, len(before) + 1)), runs
    assert any(cluster["temp_dirs"][0].glob(f"session_*/artifacts/*/{STUDY}/working_dirs/{killed['trial_dir']}"))
    error = (trial_dir / "error.txt").read_text()  # Tune's record of the trial's failures: the one
    print(f"Tune's error record of {killed['trial_dir']}:\n{error}")
    assert "Failure # 1 " in error and "Failure # 2 " not in error, error

    # MLflow: one child run per trial; the restarted one re-attached (restarts = 1), FINISHED,
    # with every epoch in its history exactly once.
    client, _, parent, children = _study_runs(cluster)
    all_children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in all_children) == sorted(TRIALS)
    name = next(n for n in TRIALS if killed["trial_dir"].endswith(n))
    for trial, run in children.items():
        assert run.info.status == "FINISHED", (trial, run.info.status)
        assert run.data.tags.get("nem_study.restarts") == ("1" if trial == name else None), (trial, run.data.tags)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "iteration"))
        assert steps == list(range(1, EPOCHS + 1)), (trial, steps)
    assert children[name].data.metrics["epochs"] == EPOCHS


def test_every_run_is_in_postgresql_with_its_artifacts(cluster):
    import psycopg2

    assert cluster["job"].returncode == 0
    client, experiment, parent, children = _study_runs(cluster)
    assert parent.info.status == "FINISHED"
    assert set(children) == set(TRIALS)
    with psycopg2.connect(**cluster["pg"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT r.run_uuid, r.name, r.status FROM runs r JOIN experiments e "
                    "ON r.experiment_id = e.experiment_id WHERE e.name = %s", (STUDY,))
        in_db = {uuid: (name, status) for uuid, name, status in cur.fetchall()}
    assert in_db == {r.info.run_id: (r.info.run_name, "FINISHED") for r in [parent, *children.values()]}

    assert experiment.artifact_location == f"mlflow-artifacts:///{STUDY}"
    for run in children.values():
        assert "test_ami" in run.data.metrics
        listed = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"test_metrics.json", "ami_per_step.json", "groupings.png", "checkpoint"} <= listed, listed
        # Uploaded through the server into its --artifacts-destination, whichever node logged them.
        on_disk = cluster["artifacts"] / STUDY / run.info.run_id / "artifacts"
        assert (on_disk / "checkpoint" / "best.pt").is_file() and (on_disk / "test_metrics.json").is_file()
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"study.yaml", "trials.json"}


async def _mlflow_ui_lists(url: str, parent_run_id: str, names: list[str], screenshot: Path) -> str:
    """Open the runs page in headless Chromium, expand the study's parent run, return the page text.

    Driven over the DevTools protocol (aiohttp's websocket client); the screenshot is saved.
    """
    import aiohttp

    port = free_port()
    profile = tempfile.mkdtemp(prefix="nem-chromium-")
    browser = subprocess.Popen(
        [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1600,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(120):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        targets = await r.json()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.5)
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                counter = 0

                async def call(method: str, **params):
                    nonlocal counter
                    counter += 1
                    await ws.send_json({"id": counter, "method": method, "params": params})
                    while True:
                        message = await ws.receive_json()
                        if message.get("id") == counter:
                            assert "error" not in message, message
                            return message.get("result", {})

                async def evaluate(expression: str):
                    return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

                async def poll(expression: str, timeout: float = 90):
                    deadline = time.time() + timeout
                    while time.time() < deadline:
                        value = await evaluate(expression)
                        if value:
                            return value
                        await asyncio.sleep(0.5)
                    return None

                await call("Page.navigate", url=url)
                # The study's parent run is a row with an expander for its child runs: open it.
                expander = f"""(() => {{ const b = document.querySelector(
                    'div[row-id="{parent_run_id}"] [col-id*="Run Name"] button');
                    if (!b) return false; b.click(); return true; }})()"""
                assert await poll(expander), "the study's parent run is not in the runs table"
                await poll("(() => { const t = document.body.innerText; return "
                           + " && ".join(f"t.includes({json.dumps(n)})" for n in names) + "; })()")
                shot = await call("Page.captureScreenshot", format="png")
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                return await evaluate("document.body.innerText")
    finally:
        _stop([browser])
        shutil.rmtree(profile, ignore_errors=True)


def test_the_mlflow_ui_lists_the_trial_runs(cluster):
    if shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip("aiohttp is not installed (it comes with ray[default])")
    assert cluster["job"].returncode == 0
    _, experiment, parent, children = _study_runs(cluster)
    url = f"{cluster['mlflow']}/#/experiments/{experiment.experiment_id}/runs"
    screenshot = ARTIFACTS / "mlflow-ui-native-cluster.png"
    text = asyncio.run(_mlflow_ui_lists(url, parent.info.run_id, TRIALS, screenshot))
    print(f"MLflow UI screenshot: {screenshot}")
    assert STUDY in text
    for name in TRIALS:
        assert name in text, text[:3000]
    assert screenshot.stat().st_size > 10_000
