"""Submit a job to a Ray cluster through Ray's Job Submission API.

    detr submit train --address http://HEAD:8265 -- --config train.yaml --set scaling.num_workers=4
    detr submit label --address http://HEAD:8265 --wait -- --model models:/shapes@champion --input s3://... --output s3://...

The job runs `python -m jobs.<name> [job args]` on the cluster. Its runtime
environment carries this project's code (`detr/`, `pipelines/`, `jobs/` and
pyproject.toml, staged in a clean folder) and its pinned requirements. A local
file named by `--config` is staged with the code and the argument rewritten, so
the job finds it; data and storage paths must be reachable from the cluster
(shared file system or object store URIs). MLflow's tracking URI travels from
`--tracking-uri` or this shell's `$MLFLOW_TRACKING_URI`. The job id is printed;
follow it with `detr jobs logs ID --follow`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from detr.errors import RaydetrError
from jobs.cli import module_main

ACCEPTS_PASSTHROUGH = True  # the job's own arguments follow `--`
USAGE = "detr submit JOB [--address ADDRESS] [--wait] [options] -- [JOB's arguments]"
SUBMITTABLE = ("train", "label", "evaluate", "promote", "rollback", "ingest")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE = ("detr", "pipelines", "jobs", "pyproject.toml")
FILE_ARGUMENTS = ("--config",)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", choices=SUBMITTABLE, help="the job to run on the cluster")
    parser.add_argument("--address", default=None,
                        help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for the job (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--no-requirements", action="store_true",
                        help="do not ask the cluster to install the pinned requirements (its image has them)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: generated)")
    parser.add_argument("--wait", action="store_true", help="follow the logs and exit with the job's status")


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    return address if "://" in address else f"http://{address}"


def job_client(address: str | None):
    """Ray's Job Submission client for the cluster at `address`; a cluster that does not answer is one line."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except ConnectionError as exc:
        raise RaydetrError(f"no Ray cluster answers at {url} ({type(exc).__name__}): start one "
                           "(cluster/local_cluster.sh start) or give its dashboard address with --address or "
                           "$RAY_ADDRESS") from exc


def pinned_requirements() -> list[str]:
    """The project's direct dependencies at the versions installed here (what the job was tested with)."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    pins = []
    for spec in pyproject["project"]["dependencies"]:
        requirement = Requirement(spec)
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        pins.append(f"{requirement.name}{extras}=={metadata.version(requirement.name)}")
    return pins


SUBMISSION_STAMP = "_submitted/submission-id"
"""A file unique to each submission in its staged code. Ray names a working_dir package by its content
and shares one unpacked copy between jobs of the same content; when one job ends Ray may delete that
copy under a job that started from it (seen: `detr submit label` right after `detr submit train`
failing on a vanished pipelines/sources/reader.py). Distinct content gives each job a package of its own."""


def stage_code(job_args: list[str], staging: Path) -> list[str]:
    """Copy the project's code into `staging` with a SUBMISSION_STAMP; stage local files given to
    FILE_ARGUMENTS and rewrite them."""
    for item in CODE:
        src = PROJECT_ROOT / item
        if src.is_dir():
            shutil.copytree(src, staging / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, staging / item)
    stamp = staging / SUBMISSION_STAMP
    stamp.parent.mkdir(exist_ok=True)
    stamp.write_text(uuid.uuid4().hex)
    args = list(job_args)
    for i, arg in enumerate(args):
        flag, _, inline = arg.partition("=")
        if flag in FILE_ARGUMENTS:
            value = inline if inline else (args[i + 1] if i + 1 < len(args) else "")
            if value and "://" not in value and Path(value).is_file():
                target = staging / "_submitted" / Path(value).name
                shutil.copy2(value, target)
                relative = str(target.relative_to(staging))
                if inline:
                    args[i] = f"{flag}={relative}"
                else:
                    args[i + 1] = relative
    return args


def submit(job: str, job_args: list[str], *, address: str | None = None, tracking_uri: str | None = None,
           requirements: bool = True, num_cpus: float | None = None, submission_id: str | None = None) -> str:
    """Submit `python -m jobs.<job> ...` with this project's code; returns the job id."""
    import shlex

    client = job_client(address)
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    with tempfile.TemporaryDirectory(prefix="raydetr-submit-") as tmp:
        staging = Path(tmp)
        args = stage_code(list(job_args), staging)
        runtime_env: dict = {"working_dir": str(staging), "env_vars": env_vars}
        if requirements:
            runtime_env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
        return client.submit_job(
            entrypoint=f"python -m jobs.{job} " + " ".join(shlex.quote(a) for a in args),
            runtime_env=runtime_env,
            entrypoint_num_cpus=num_cpus,
            submission_id=submission_id,
            metadata={"raydetr.job": job},
        )


def wait_for(job_id: str, address: str | None = None, follow_logs: bool = True) -> str:
    """Follow a job until it ends; returns its final status."""
    import asyncio
    import time

    from ray.job_submission import JobStatus

    client = job_client(address)
    if follow_logs:
        async def tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)

        asyncio.run(tail())
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(1)


def run(args: argparse.Namespace) -> int:
    job_id = submit(args.job, args.passthrough, address=args.address, tracking_uri=args.tracking_uri,
                    requirements=not args.no_requirements, num_cpus=args.num_cpus,
                    submission_id=args.submission_id)
    print(f"submitted {args.job} job {job_id} to {dashboard_address(args.address)}", flush=True)
    if not args.wait:
        print(f"follow it with: detr jobs logs {job_id} --follow")
        return 0
    status = wait_for(job_id, args.address)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
