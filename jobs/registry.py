"""The MLflow model registry as promotion uses it: aliases, their history, and decision records.

Aliases (not the deprecated stages) say which version serves a purpose
(`champion`). MLflow keeps only an alias's current version, so promotion keeps
the alias's history as a tag on the registered model (a JSON list of versions,
oldest first); `rollback` walks it back. Every promotion decision is recorded as
tags on the candidate version, prefixed `raydetr.promotion.<alias>.`.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from detr.errors import RaydetrError

HISTORY_TAG = "raydetr.alias_history.{alias}"
DECISION_PREFIX = "raydetr.promotion.{alias}."


def client_for(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def alias_holder(client, name: str, alias: str):
    """The version holding `alias`, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def alias_history(client, name: str, alias: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return [str(v) for v in json.loads(tags.get(HISTORY_TAG.format(alias=alias), "[]"))]


def _save_history(client, name: str, alias: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history))


def move_alias(client, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`, remembering the holder it replaces."""
    history = alias_history(client, name, alias)
    holder = alias_holder(client, name, alias)
    if holder is not None and (not history or history[-1] != str(holder.version)):
        history.append(str(holder.version))  # the alias was moved outside raydetr: keep that holder too
    history.append(str(version))
    client.set_registered_model_alias(name, alias, str(version))
    _save_history(client, name, alias, history)


def roll_back_alias(client, name: str, alias: str) -> tuple[str, str]:
    """Point `alias` back at its previous holder; returns (from version, to version)."""
    holder = alias_holder(client, name, alias)
    if holder is None:
        raise RaydetrError(f"registered model {name!r} has no alias {alias!r} to roll back")
    history = alias_history(client, name, alias)
    if not history or history[-1] != str(holder.version):
        history.append(str(holder.version))
    if len(history) < 2:
        raise RaydetrError(f"alias {alias!r} of {name!r} has no previous holder (history: {history})")
    current = history.pop()
    previous = history[-1]
    client.set_registered_model_alias(name, alias, previous)
    _save_history(client, name, alias, history)
    return current, previous


def record_decision(client, name: str, version: str, alias: str, decision: Mapping[str, Any]) -> None:
    prefix = DECISION_PREFIX.format(alias=alias)
    for key, value in decision.items():
        client.set_model_version_tag(name, str(version), prefix + key, "" if value is None else str(value))
