"""What a study leaves in MLflow: the one contract between its writer and its reader.

``nem_study.tracking`` writes it (a parent run per study, a child run per trial) and
``analysis`` reads it back; both take the tag names, artifact names, URI handling and the
client from here. Standard library only at import time: the report imports this module
without torch or Ray (``mlflow`` itself is imported when a client is first asked for).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"   # a study's tracking.uri unless it sets one

# Tags
PARENT_TAG = "mlflow.parentRunId"    # what the MLflow UI nests child runs by
KIND_TAG = "nem_study.kind"          # "study" on a parent run
STUDY_TAG = "nem_study.study"        # the study name on its parent run, to find it again
TRIAL_TAG = "nem_study.trial"        # the trial name on a child run, to re-attach after a restart
CELL_TAG = "nem_study.cell"          # the trial's grid cell, as JSON
SEED_TAG = "nem_study.seed"
SAMPLED_TAG = "nem_study.sampled."   # + key: a value sampled by the search

# Artifacts of a parent run
STUDY_RESOLVED = "study_resolved.yaml"   # the study as it started, --set included: resume compares
TRIALS = "trials.json"
# Artifacts of a child run
AMI_PER_STEP = "ami_per_step.json"
TEST_METRICS = "test_metrics.json"
EVALUATIONS = "evaluations.json"
GROUPINGS = "groupings.png"              # and groupings-<evaluation>.png
CHECKPOINT = "checkpoint"                # folder of the best checkpoint


def has_scheme(uri: str) -> bool:
    """``s3://b``, ``http://h``, ``mlflow-artifacts:/x``: a URI, not a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) is not None


def resolve_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``; plain paths -> ``file://`` URIs;
    any other URI as it is. Resolved once, where the command runs: Ray runs each trial in its
    own working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if not has_scheme(uri):
        return Path(uri).resolve().as_uri()
    return uri


def http_unreachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """For an HTTP(S) tracking server, why one short request failed (None if it answered, or if
    ``uri`` is no server). The MLflow client itself retries for minutes before it gives up."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri, timeout=timeout_s)
    except requests.RequestException as e:
        return type(e).__name__
    return None


@functools.cache
def client(uri: str):
    """One ``MlflowClient`` per tracking URI and process."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)
