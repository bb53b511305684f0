"""List, inspect, follow and stop jobs on a Ray cluster (Ray's Job Submission API).

    detr jobs list [--address http://HEAD:8265]
    detr jobs status JOB_ID
    detr jobs logs JOB_ID [--follow]
    detr jobs stop JOB_ID
"""
from __future__ import annotations

import argparse
import sys

from detr.errors import RaydetrError
from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "status", "logs", "stop"))
    parser.add_argument("job_id", nargs="?", help="the job (all but `list`)")
    parser.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS or "
                        "http://127.0.0.1:8265)")
    parser.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")


def run(args: argparse.Namespace) -> int:
    from jobs.submit import dashboard_address, job_client, wait_for

    client = job_client(args.address)
    if args.action == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'job id':<28} {'status':<10} {'entrypoint'}")
        for job in jobs:
            print(f"{job.submission_id or job.job_id:<28} {job.status.value:<10} {job.entrypoint}")
        return 0
    if not args.job_id:
        raise RaydetrError(f"`detr jobs {args.action}` needs a JOB_ID")
    if args.job_id not in {job.submission_id or job.job_id for job in client.list_jobs()}:
        raise RaydetrError(f"no job {args.job_id!r} on the cluster at {dashboard_address(args.address)} "
                           "(`detr jobs list` shows its jobs)")
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            status = wait_for(args.job_id, args.address)
            return 0 if status == "SUCCEEDED" else 1
        print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
