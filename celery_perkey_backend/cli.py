"""``celery -A proj perkey …``: operator commands, added to Celery's own CLI through the
``celery.commands`` entry point.

Exit codes (the README's table): 0 done; 1 ``inspect`` found nothing; 2 usage error; 3
the server cannot be reached (an outage: try again later); 4 the app does not use this
backend; 5 ``sweep`` skipped because another sweep holds the lock; 6 ``doctor`` found
something dangerous; 7 ``migrate --check``: keys of ``redis://`` are still in flight; 8 a
configuration error: a wrong setting or URL, a password, user, ACL right or TLS setting
the server refuses, a missing extra (trying again cannot help).
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

import click

from .doctor import SEVERITIES, Report, diagnose
from .errors import AccessDeniedError, ConfigurationError, PerkeyError, quote_id
from .keys import LEGACY_KINDS, parse_ready
from .legacy import LegacySurvey, expire_legacy, survey
from .prometheus import render, write_textfile
from .settings import parse_duration
from .stats import TTL_BUCKETS, collect_stats, human_bytes
from .store import Record
from .sweep import CLASSES
from .tasks import uses_perkey

__all__ = ["perkey"]

EXIT_NOT_FOUND = 1
EXIT_UNAVAILABLE = 3
EXIT_NOT_PERKEY = 4
EXIT_LOCKED = 5
EXIT_DANGER = 6
EXIT_IN_FLIGHT = 7
EXIT_CONFIGURATION = 8

#: Above this many keys in the database, ``sweep`` shows a progress bar.
PROGRESS_THRESHOLD = 10_000


def _backend(ctx: click.Context) -> Any:
    app = ctx.obj.app
    if not uses_perkey(app):
        _fail(f"result_backend of app {app.main!r} is not perkey://", EXIT_NOT_PERKEY)
    return app.backend


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _guard(func: Any) -> Any:
    """Turn our errors into one clear line and a non-zero exit; nothing else leaks."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigurationError, AccessDeniedError) as exc:
            _fail(str(exc).splitlines()[0], EXIT_CONFIGURATION)
        except PerkeyError as exc:
            _fail(str(exc).splitlines()[0], EXIT_UNAVAILABLE)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


@click.group(name="perkey")
def perkey() -> None:
    """Inspect and sweep the perkey result backend's keys."""


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check a duration option at once (exit 2), naming the option once."""
    if value is not None:
        try:
            parse_duration(value, param.name or "duration")
        except PerkeyError:
            raise click.BadParameter(
                f"{value!r} is not a duration: use seconds, or e.g. 90s, 30m, 2h, 1d, 1w"
            ) from None
    return value


@perkey.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--sample-limit", default=100_000, show_default=True, help="Keys examined at most.")
@click.option("--verbose", "-v", is_flag=True, help="Name the keys of an unexpected type.")
@click.pass_context
@_guard
def stats(ctx: click.Context, as_json: bool, sample_limit: int, verbose: bool) -> None:
    """Count result keys by kind and remaining TTL."""
    figures = collect_stats(_backend(ctx), sample_limit=sample_limit)
    if as_json:
        click.echo(json.dumps(figures.as_dict(), indent=2))
        return
    rows = [(f"keys: {kind}", str(n)) for kind, n in figures.by_kind.items()]
    rows += [(f"ttl {name}", str(figures.ttl_histogram[name])) for name, _ in TTL_BUCKETS]
    age = figures.oldest_no_ttl_age
    rows += [
        ("without ttl (the sweep fixes these)", str(figures.no_ttl)),
        ("oldest without ttl", "-" if age is None else f"{age:.0f}s"),
        ("unexpected type (never touched)", str(figures.unexpected_type)),
        ("chords stalled", str(figures.chords_stalled)),
        (
            "bytes per key (sampled)",
            "-" if figures.bytes_per_key is None else human_bytes(figures.bytes_per_key),
        ),
        ("our keys", str(figures.our_keys)),
        ("keys in database", str(figures.db_keys)),
        ("used memory", human_bytes(figures.used_memory)),
    ]
    for kind in LEGACY_KINDS:
        count, bare = figures.legacy_keys.get(kind, 0), figures.legacy_without_ttl.get(kind, 0)
        rows.append((f"redis:// {kind} keys", f"{count} ({bare} without ttl)"))
    _table(rows)
    if figures.sampled:
        click.echo(f"(estimated from a sample of {figures.examined} keys)")
    if verbose and figures.unexpected_keys:
        more = figures.unexpected_type - len(figures.unexpected_keys)
        click.echo(
            "keys of an unexpected type"
            + (f" (first {len(figures.unexpected_keys)})" if more > 0 else "")
            + ":"
        )
        for key in figures.unexpected_keys:
            click.echo(f"  {_safe(key)}")


@perkey.command(name="sweep")
@click.option("--dry-run", is_flag=True, help="Report what would be done; change nothing.")
@click.option("--delete", is_flag=True, help="Unlink keys past --max-age instead.")
@click.option(
    "--max-age",
    default=None,
    callback=_duration,
    help="Age past which a key is too old, e.g. 1d, 6h.",
)
@click.option("--chords-only", is_flag=True, help="Only repair stalled chords.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
@_guard
def sweep_command(
    ctx: click.Context,
    dry_run: bool,
    delete: bool,
    max_age: str | None,
    chords_only: bool,
    as_json: bool,
) -> None:
    """Find result keys without a TTL, too old, or left over, and fix them; publish the
    bodies of stalled chords."""
    backend = _backend(ctx)
    total = backend.store.dbsize()
    options = {
        "dry_run": dry_run,
        "delete": delete or None,
        "max_age": max_age,
        "chords_only": chords_only,
    }
    if total > PROGRESS_THRESHOLD and not as_json:
        with click.progressbar(length=total, label="sweeping", file=sys.stderr) as bar:
            seen = [0]

            def advance(scanned: int, _total: int) -> None:
                bar.update(scanned - seen[0])
                seen[0] = scanned

            summary = backend.run_sweep(progress=advance, **options)
    else:
        summary = backend.run_sweep(**options)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        rows = [(f"class {name}", str(summary.by_class[name])) for name in CLASSES]
        rows += [
            ("scanned", str(summary.scanned)),
            ("ttl set" if not dry_run else "ttl would be set", str(summary.ttl_set)),
            ("unlinked" if not dry_run else "would unlink", str(summary.unlinked)),
            ("bytes reclaimed (est.)", str(summary.bytes_reclaimed)),
            ("chords stalled", str(summary.chords_stalled)),
        ]
        if not dry_run:
            rows += [
                ("chords repaired", str(summary.chords_repaired)),
                ("chords settled", str(summary.chords_settled)),
                ("chords failed", str(summary.chords_failed)),
            ]
        rows.append(("duration", f"{summary.duration:.3f}s"))
        _table(rows)
        verbs = {"ttl": "set ttl on", "unlink": "unlink", "repair": "repair the chord of"}
        for action, key in summary.planned:
            click.echo(f"would {verbs[action]} {key}")
        if summary.planned_total > len(summary.planned):
            click.echo(
                f"(listed the first {len(summary.planned)} of {summary.planned_total} "
                "actions it would take; the counts above are complete)"
            )
        click.echo(summary.line())
    if summary.skipped_locked:
        sys.exit(EXIT_LOCKED)


@perkey.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@_guard
def inspect(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Show a task's keys, their type and TTL, and the decoded meta."""
    backend = _backend(ctx)
    layout = backend.layout
    report: dict[str, Any] = {"task_id": task_id, "keys": []}
    names = [
        layout.result(task_id),
        layout.state(task_id),
        layout.watchers(task_id),
        layout.progress(task_id),
        layout.legacy(task_id),
    ]
    for info in backend.store.inspect(names, f"inspect task {quote_id(task_id)}"):
        entry: dict[str, Any] = {"key": info.key, "type": info.type, "ttl_ms": info.ttl_ms}
        entry["raw"] = _safe(info.raw)
        if info.key in names[:2] and isinstance(info.raw, bytes):
            ready = info.key == names[0]
            try:
                entry["written_ms"] = parse_ready(info.raw).written_ms
                record = Record(task_id, info.key, info.raw, "ready" if ready else "progress")
                meta = backend.decode_record(record)
                entry["meta"] = _jsonable(meta)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
        report["keys"].append(entry)
    try:
        report["state"] = _jsonable(backend.get_task_meta(task_id, cache=False))
    except PerkeyError as exc:
        report["state"] = {"status": "UNREADABLE", "error": str(exc)}
    if as_json:
        click.echo(json.dumps(report, indent=2, default=repr))
    else:
        click.echo(f"task {task_id}: {report['state'].get('status')}")
        for entry in report["keys"]:
            click.echo(f"  {entry['key']}  type={entry['type']}  ttl_ms={entry['ttl_ms']}")
            if "meta" in entry:
                click.echo(f"    meta: {json.dumps(entry['meta'], default=repr)}")
            if "error" in entry:
                click.echo(f"    unreadable: {entry['error']}")
            click.echo(f"    raw: {entry['raw']}")
    if not report["keys"]:
        sys.exit(EXIT_NOT_FOUND)


@perkey.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for monitoring.")
@click.option("--sample-limit", default=100_000, show_default=True, help="Keys examined at most.")
@click.pass_context
@_guard
def doctor(ctx: click.Context, as_json: bool, sample_limit: int) -> None:
    """Check the server and the app's settings for hazards to results.

    Exits 6 when a finding is dangerous, 0 otherwise (3 or 8 when it cannot look).
    """
    report = diagnose(_backend(ctx), sample_limit=sample_limit)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=repr))
    else:
        _print_report(report)
    if report.dangerous:
        sys.exit(EXIT_DANGER)


def _print_report(report: Report) -> None:
    """Worst first; for each finding that is not ok, why it matters and the fix."""
    order = {name: rank for rank, name in enumerate(reversed(SEVERITIES))}
    for finding in sorted(report.findings, key=lambda f: order[f.severity]):
        click.echo(f"{finding.severity.upper():<8}{finding.rule}: {finding.finding}")
        if finding.severity != "ok":
            for label, text in (("why", finding.why), ("fix", finding.fix)):
                click.echo(
                    textwrap.fill(
                        f"{label}: {text}", 100, initial_indent=" " * 8, subsequent_indent=" " * 13
                    )
                )
    counts = report.counts()
    click.echo(", ".join(f"{name}: {counts[name]}" for name in reversed(SEVERITIES)))


@perkey.command()
@click.option("--check", is_flag=True, help="Exit 7 while keys of redis:// are in flight.")
@click.option(
    "--expire-legacy",
    "ttl",
    default=None,
    callback=_duration,
    help="First give keys of redis:// that have no TTL this one, e.g. 1d.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@_guard
def migrate(ctx: click.Context, check: bool, ttl: str | None, as_json: bool) -> None:
    """Say whether the switch from redis:// is done: whether any result or saved group
    that redis:// wrote is left, which perkey_legacy_fallback still has to read."""
    backend = _backend(ctx)
    given = None
    if ttl is not None:
        given = expire_legacy(backend.store, parse_duration(ttl, "--expire-legacy"))
    report = survey(backend.store, backend.decode_record)
    if as_json:
        click.echo(json.dumps({**report.as_dict(), "ttl_given": given}, indent=2))
    else:
        if given is not None:
            click.echo(f"gave {given} key(s) of redis:// a TTL of {ttl}")
        last = report.last_expiry_s
        _table(
            [
                ("redis:// results", str(report.results)),
                ("  not ready yet", str(report.results_not_ready)),
                ("  unreadable", str(report.results_unreadable)),
                ("  without ttl", str(report.results_without_ttl)),
                ("redis:// saved groups", str(report.groups)),
                ("  without ttl", str(report.groups_without_ttl)),
                ("redis:// chord keys (never read)", str(report.chord_keys)),
                ("last one expires in", "-" if last is None else f"{last:.0f}s"),
                ("perkey_legacy_fallback", "on" if report.fallback else "off"),
            ]
        )
        click.echo(_verdict(report))
    if check and report.in_flight:
        sys.exit(EXIT_IN_FLIGHT)


@perkey.command()
@click.option("--textfile", default=None, help="Write them to this file instead (node-exporter).")
@click.pass_context
@_guard
def metrics(ctx: click.Context, textfile: str | None) -> None:
    """Print the Prometheus metrics, as a scrape would see them now."""
    store = _backend(ctx).store
    try:
        if textfile:
            write_textfile(store, textfile)
        else:
            click.echo(render(store).decode(), nl=False)
    except ImportError:
        _fail(
            "prometheus_client is missing: pip install 'celery-perkey-backend[prometheus]'",
            EXIT_CONFIGURATION,
        )


def _verdict(report: LegacySurvey) -> str:
    if not report.in_flight:
        return (
            "done: no result or saved group of redis:// is left; "
            "perkey_legacy_fallback can be turned off"
        )
    line = f"in flight: {report.in_flight} key(s) of redis:// left"
    if report.fallback:
        line += "; keep perkey_legacy_fallback on"
    else:
        line += "; perkey_legacy_fallback is OFF, so they read as PENDING"
    if report.results_not_ready:
        line += f"; {report.results_not_ready} task(s) still running on a redis:// worker"
    if report.without_ttl:
        line += f"; {report.without_ttl} never expire (give them a TTL: --expire-legacy 1d)"
    elif report.last_expiry_s is not None:
        line += f"; the last expires in {report.last_expiry_s:.0f}s"
    return line


def _safe(raw: Any, limit: int = 200) -> str:
    """A printable, bounded rendering of raw bytes: never raw control bytes."""
    text = repr(raw)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def _table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")
