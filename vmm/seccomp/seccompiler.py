"""Firecracker seccompiler's JSON filter format: read a custom filter file, write Ember's filters.

The format (Firecracker docs/seccompiler.md, resources/seccomp/*.json)::

    {"vmm":  {"default_action": "kill_process", "filter_action": "allow",
              "filter": [{"syscall": "read"},
                         {"syscall": "ioctl", "comment": "KVM_RUN",
                          "args": [{"index": 1, "type": "dword", "op": "eq", "val": 44672,
                                    "comment": "KVM_RUN"}]},
                         {"syscall": "mmap",
                          "args": [{"index": 2, "type": "dword", "op": {"masked_eq": 4}, "val": 0}]}]},
     "api":  {...},
     "vcpu": {...}}

Actions: ``"allow"``, ``"trap"``, ``"kill_process"``, ``"kill_thread"``,
``"log"``, ``{"errno": N}``, ``{"trace": N}`` (``"kill"``, from older
Firecracker documents, is ``"kill_process"``). Condition operators: ``eq``,
``ne``, ``lt``, ``le``, ``gt``, ``ge`` and ``{"masked_eq": MASK}``; values
are base-10 integers. A file must define all three thread categories
(``vmm``, ``api``, ``vcpu``) and nothing else; unknown keys are refused,
so a typo cannot silently drop a restriction.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .model import Action, ActionKind, ArgWidth, Condition, Filter, Op, Role, Rule, SeccompError

__all__ = ["FilterFileError", "filters_from_json", "filters_to_json", "read_filter_file"]

_ACTION_NAMES = {k.value: k for k in (ActionKind.ALLOW, ActionKind.TRAP, ActionKind.KILL_PROCESS,
                                      ActionKind.KILL_THREAD, ActionKind.LOG)}
_ACTION_NAMES["kill"] = ActionKind.KILL_PROCESS
_VALUED_ACTIONS = {"errno": ActionKind.ERRNO, "trace": ActionKind.TRACE}
_PLAIN_OPS = {op.value: op for op in Op if op is not Op.MASKED_EQ}


class FilterFileError(SeccompError):
    """The seccomp filter file is not a valid seccompiler JSON document."""


def _keys(obj: Any, where: str, required: set[str], optional: frozenset[str] | set[str] = frozenset()) -> dict:
    if not isinstance(obj, dict):
        raise FilterFileError(f"{where}: expected a JSON object")
    missing = required - obj.keys()
    if missing:
        raise FilterFileError(f"{where}: missing {', '.join(sorted(missing))}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise FilterFileError(f"{where}: unknown field {', '.join(sorted(unknown))}")
    return obj


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FilterFileError(f"{where}: expected an integer, got {json.dumps(value)}")
    return value


def _action(value: Any, where: str) -> Action:
    if isinstance(value, str):
        kind = _ACTION_NAMES.get(value.lower())
        if kind is None:
            raise FilterFileError(f"{where}: unknown action {value!r}")
        return Action(kind)
    if isinstance(value, dict) and len(value) == 1:
        (name, arg), = value.items()
        kind = _VALUED_ACTIONS.get(str(name).lower())
        if kind is not None:
            try:
                return Action(kind, _int(arg, f"{where}.{name}"))
            except SeccompError as exc:
                raise FilterFileError(f"{where}: {exc}") from None
    raise FilterFileError(f"{where}: unknown action {json.dumps(value)}")


def _condition(obj: Any, where: str) -> Condition:
    c = _keys(obj, where, {"index", "type", "op", "val"}, {"comment"})
    width_name = c["type"]
    if width_name not in ("dword", "qword"):
        raise FilterFileError(f"{where}.type: expected \"dword\" or \"qword\", got {json.dumps(width_name)}")
    op_value, mask = c["op"], None
    if isinstance(op_value, dict) and set(op_value) == {"masked_eq"}:
        op, mask = Op.MASKED_EQ, _int(op_value["masked_eq"], f"{where}.op.masked_eq")
    elif isinstance(op_value, str) and op_value in _PLAIN_OPS:
        op = _PLAIN_OPS[op_value]
    else:
        raise FilterFileError(f"{where}.op: expected eq, ne, lt, le, gt, ge or {{\"masked_eq\": MASK}}, "
                              f"got {json.dumps(op_value)}")
    comment = c.get("comment", "")
    if not isinstance(comment, str):
        raise FilterFileError(f"{where}.comment: expected a string")
    try:
        return Condition(_int(c["index"], f"{where}.index"), op, _int(c["val"], f"{where}.val"),
                         ArgWidth(width_name), mask=mask, comment=comment)
    except SeccompError as exc:
        raise FilterFileError(f"{where}: {exc}") from None


def _rule(obj: Any, where: str) -> Rule:
    r = _keys(obj, where, {"syscall"}, {"args", "comment"})
    name = r["syscall"]
    if not isinstance(name, str) or not name:
        raise FilterFileError(f"{where}.syscall: expected a syscall name")
    args = r.get("args", [])
    if not isinstance(args, list):
        raise FilterFileError(f"{where}.args: expected a list of conditions")
    comment = r.get("comment", "")
    if not isinstance(comment, str):
        raise FilterFileError(f"{where}.comment: expected a string")
    return Rule(name, tuple(_condition(a, f"{where}.args[{i}]") for i, a in enumerate(args)), comment)


def _filter(obj: Any, where: str) -> Filter:
    f = _keys(obj, where, {"default_action", "filter_action", "filter"})
    rules = f["filter"]
    if not isinstance(rules, list):
        raise FilterFileError(f"{where}.filter: expected a list of rules")
    return Filter(tuple(_rule(r, f"{where}.filter[{i}]") for i, r in enumerate(rules)),
                  default_action=_action(f["default_action"], f"{where}.default_action"),
                  filter_action=_action(f["filter_action"], f"{where}.filter_action"))


def filters_from_json(doc: Any) -> dict[Role, Filter]:
    """Validate a parsed seccompiler document (untrusted) into one `Filter` per role."""
    top = _keys(doc, "filter file", {r.value for r in Role})
    return {role: _filter(top[role.value], role.value) for role in Role}


def read_filter_file(path: str) -> dict[Role, Filter]:
    """Read and validate the seccompiler JSON file at `path`; raises `FilterFileError`."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise FilterFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FilterFileError(f"{path} is not JSON: {exc}") from exc
    try:
        return filters_from_json(doc)
    except FilterFileError as exc:
        raise FilterFileError(f"{path}: {exc}") from None


def _action_json(action: Action) -> Any:
    if action.kind in (ActionKind.ERRNO, ActionKind.TRACE):
        return {action.kind.value: action.value}
    return action.kind.value


def _condition_json(c: Condition) -> dict[str, Any]:
    out: dict[str, Any] = {"index": c.index, "type": c.width.value,
                           "op": {"masked_eq": c.mask} if c.op is Op.MASKED_EQ else c.op.value, "val": c.value}
    if c.comment:
        out["comment"] = c.comment
    return out


def filters_to_json(filters: Mapping[Role, Filter]) -> dict[str, Any]:
    """The seccompiler document of `filters` (each rule's reason as its comment)."""
    doc: dict[str, Any] = {}
    for role in Role:
        flt = filters[role]
        rules = []
        for r in flt.rules:
            entry: dict[str, Any] = {"syscall": r.syscall}
            if r.reason:
                entry["comment"] = r.reason
            if r.args:
                entry["args"] = [_condition_json(c) for c in r.args]
            rules.append(entry)
        doc[role.value] = {"default_action": _action_json(flt.default_action),
                           "filter_action": _action_json(flt.filter_action), "filter": rules}
    return doc
