"""Promote a registered model version to an alias only if it beats the current holder.

    detr promote --name shapes --candidate 7 --alias champion --min-gain 0.005 --data data/holdout.json
    detr promote ... --dry-run        # print the decision, change nothing

The candidate and the alias's current holder are evaluated on the same held-out
data (an earlier evaluation of a version on data with the same content digest
is reused). The alias moves to the candidate only when its AP beats the
holder's by at least `--min-gain`; with no holder the candidate is promoted.
Either way the decision (both metrics, the dataset digest, the time and the
reason) is recorded as tags on the candidate version. `detr rollback` undoes a
promotion.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

from detr.errors import RaydetrError
from jobs.cli import module_main


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--candidate", required=True, help="version to promote")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--min-gain", type=float, default=0.005, help="AP the candidate must add to the holder's")
    parser.add_argument("--data", required=True, help="held-out labelled data both versions are evaluated on")
    parser.add_argument("--images", help="image folder of a COCO JSON when it is not the JSON's folder")
    parser.add_argument("--metric", default="AP", help="COCO metric compared (AP, AP50, AP75, ...)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--dry-run", action="store_true", help="print the decision only")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")


@dataclass
class Decision:
    name: str
    alias: str
    candidate_version: str
    holder_version: str | None
    metric: str
    candidate_value: float
    holder_value: float | None
    min_gain: float
    dataset_digest: str
    promoted: bool
    reason: str
    decided_at: str
    dry_run: bool = False

    def describe(self) -> str:
        if self.holder_version is None:
            holder = "no current holder"
        elif self.holder_value is None:
            holder = f"holder v{self.holder_version}"
        else:
            holder = f"holder v{self.holder_version} {self.metric} {self.holder_value:.4f}"
        verb = "would move" if self.dry_run else "moved"
        action = f"{verb} alias {self.alias!r} to v{self.candidate_version}" if self.promoted else \
            f"alias {self.alias!r} left on v{self.holder_version}"
        return (f"{self.name}: candidate v{self.candidate_version} {self.metric} {self.candidate_value:.4f}, "
                f"{holder}; {action} ({self.reason})")


def decide(candidate: float, holder: float | None, min_gain: float, metric: str) -> tuple[bool, str]:
    """The quality gate: promote when there is no holder or the candidate beats it by `min_gain`."""
    if holder is None:
        return True, "no current holder"
    gain = candidate - holder
    if gain >= min_gain:
        return True, f"{metric} gain {gain:+.4f} >= {min_gain:.4f}"
    return False, f"{metric} gain {gain:+.4f} < {min_gain:.4f}"


def promote(
    name: str,
    candidate: str,
    data: str,
    *,
    alias: str = "champion",
    min_gain: float = 0.005,
    metric: str = "AP",
    images: str | None = None,
    batch_size: int = 4,
    concurrency: int = 1,
    tracking_uri: str | None = None,
    dry_run: bool = False,
    address: str | None = None,
) -> Decision:
    from jobs.evaluate import evaluate
    from jobs.registry import alias_holder, client_for, move_alias, record_decision
    from jobs.tracking import ensure_tracking_available, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    ensure_tracking_available(uri)
    client = client_for(uri)
    client.get_model_version(name, str(candidate))  # fails clearly when the version does not exist
    holder = alias_holder(client, name, alias)
    holder_version = str(holder.version) if holder is not None else None
    common = dict(images=images, batch_size=batch_size, concurrency=concurrency, tracking_uri=uri, address=address)
    cand_eval = evaluate(f"models:/{name}/{candidate}", data, **common)
    if metric not in cand_eval.metrics:
        raise RaydetrError(f"unknown metric {metric!r}; choose from {sorted(cand_eval.metrics)}")
    holder_value = None
    if holder_version is not None and holder_version != str(candidate):
        holder_value = evaluate(f"models:/{name}/{holder_version}", data, **common).metrics[metric]
    if holder_version == str(candidate):
        promoted, reason = False, f"v{candidate} already holds {alias!r}"
    else:
        promoted, reason = decide(cand_eval.metrics[metric], holder_value, min_gain, metric)
    decision = Decision(name, alias, str(candidate), holder_version, metric, cand_eval.metrics[metric], holder_value,
                        min_gain, cand_eval.digest, promoted, reason,
                        time.strftime("%Y-%m-%dT%H:%M:%S%z"), dry_run)
    if not dry_run:
        if promoted:
            move_alias(client, name, alias, str(candidate))
        record_decision(client, name, str(candidate), alias,
                        {k: v for k, v in asdict(decision).items() if k not in ("name", "alias", "dry_run")})
    return decision


def run(args: argparse.Namespace) -> int:
    from jobs.tracking import resolve_tracking_uri

    print(f"MLflow registry: {resolve_tracking_uri(args.tracking_uri)}", flush=True)  # which store, said first
    decision = promote(args.name, args.candidate, args.data, alias=args.alias, min_gain=args.min_gain,
                       metric=args.metric, images=args.images, batch_size=args.batch_size,
                       concurrency=args.concurrency, tracking_uri=args.tracking_uri, dry_run=args.dry_run,
                       address=args.address)
    print(("[dry run] " if args.dry_run else "") + decision.describe())
    return 0


if __name__ == "__main__":
    sys.exit(module_main(sys.modules[__name__]))
