"""Rendering an :class:`protocols.audit.AuditResult` for people (terminal, Markdown, HTML) and
machines (JSON). Pure functions from the result to text; no verification happens here."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from protocols.audit import AuditResult, EntryRecord

__all__ = [
    "render_terminal",
    "render_markdown",
    "render_html",
    "render_json",
    "write_report",
    "format_time",
    "entry_rows",
]


def format_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(digest: str | None, n: int = 12) -> str:
    if not digest:
        return "-"
    head, _, tail = digest.partition(":")
    return f"{head}:{tail[:n]}" if tail else digest[:n]


def _verdict_line(result: AuditResult) -> str:
    if result.ok:
        head = f"VERIFIED: {result.tree_size} entries, root {result.root_hex[:16]}..., "
        if result.served_digest is None:
            # An offline audit (or --no-served) has no served model to compare.
            return head + "served model not checked (no coordinator to fetch it from)"
        return (
            head + f"served model {_short(result.served_digest)} is the replay of the signed updates"
        )
    first = result.first_failure
    assert first is not None
    where = f"entry {first.entry_index}" if first.entry_index is not None else "ledger"
    return (
        f"FAILED ({first.failure_class}, exit {first.exit_code}) at {where}: {first.message}"
    )


def entry_rows(entries: list[EntryRecord]) -> list[dict[str, Any]]:
    return [e.to_json() for e in entries]


def render_terminal(result: AuditResult) -> str:
    lines = [
        f"audit of {result.source} (origin {result.origin})",
        f"  checkpoint: size {result.tree_size}, root {result.root_hex}",
        f"  entries: {result.tree_size} "
        + "("
        + ", ".join(f"{k} {v}" for k, v in sorted(result.kind_counts.items()))
        + ")",
        f"  sites: {len(result.sites)}",
    ]
    for s in result.sites:
        status = "revoked" if s.revoked else "enrolled"
        conds = ", ".join(s.conditions[:4]) if s.conditions else "-"
        if len(s.conditions) > 4:
            conds += f", ... (+{len(s.conditions) - 4})"
        lines.append(
            f"    {s.site_id:<20} {status:<8} updates {s.updates:>5}  last seq {s.last_sequence:>5}"
            f"  conditions ({len(s.conditions)}): {conds}"
        )
    if result.previous_checkpoint_size is not None:
        lines.append(
            f"  consistent with this auditor's checkpoint of size {result.previous_checkpoint_size}"
            if not any(f.failure_class == "LOG_FORK" for f in result.findings)
            else f"  NOT consistent with this auditor's checkpoint of size "
            f"{result.previous_checkpoint_size}"
        )
    if result.served_digest:
        lines.append(f"  served model: {result.served_digest}")
    if result.replay_digest:
        lines.append(f"  replayed model: {result.replay_digest}")
    lines.append(
        f"  witness cosignatures: {len(result.witnesses)}"
        + (f" ({', '.join(result.witnesses)})" if result.witnesses else "")
        + (f"; required {result.witness_threshold}" if result.witness_threshold else "")
    )
    if result.cosigned_by:
        lines.append(f"  cosigned by this auditor as {result.cosigned_by}")
    for f in result.findings[1:]:
        where = f"entry {f.entry_index}" if f.entry_index is not None else "ledger"
        lines.append(f"  also: {f.failure_class} at {where}: {f.message}")
    lines.append(f"  took {result.seconds:.2f} s")
    lines.append(_verdict_line(result))
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(result: AuditResult) -> str:
    out = [
        "# scarches-fl ledger audit",
        "",
        f"**Verdict:** {_md_escape(_verdict_line(result))}",
        "",
        f"- Source: {result.source}",
        f"- Origin: `{result.origin}`",
        f"- Checkpoint: size {result.tree_size}, root `{result.root_hex}`",
        f"- Audited at: {format_time(result.audited_at)} ({result.seconds:.2f} s)",
        f"- Served model: `{result.served_digest or '-'}`",
        f"- Replayed model: `{result.replay_digest or '-'}`",
        f"- Witness cosignatures: {len(result.witnesses)}"
        + (f" (required {result.witness_threshold})" if result.witness_threshold else ""),
        "",
    ]
    if result.findings:
        out += ["## Findings", "", "| class | exit | entry | reason | message |", "|---|---|---|---|---|"]
        for f in result.findings:
            out.append(
                f"| {f.failure_class} | {f.exit_code} | "
                f"{f.entry_index if f.entry_index is not None else '-'} | {f.reason_code} | "
                f"{_md_escape(f.message)} |"
            )
        out.append("")
    out += [
        "## Sites",
        "",
        "| site | status | keys | updates | last sequence | conditions |",
        "|---|---|---|---|---|---|",
    ]
    for s in result.sites:
        out.append(
            f"| {s.site_id} | {'revoked' if s.revoked else 'enrolled'} | "
            f"{_md_escape(', '.join(s.key_ids))} | {s.updates} | {s.last_sequence} | "
            f"{_md_escape(', '.join(s.conditions)) or '-'} |"
        )
    out += [
        "",
        "## History",
        "",
        "| # | kind | time | site | seq | base | conditions | diff | version digest | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result.entries:
        out.append(
            f"| {e.index} | {e.kind} | {format_time(e.timestamp)} | {e.site_id or '-'} | "
            f"{e.sequence if e.sequence is not None else '-'} | "
            f"{e.base_size if e.base_size is not None else '-'} | "
            f"{_md_escape(', '.join(e.conditions)) or '-'} | "
            f"{(_short(e.diff_sha256) + f' ({e.diff_size} B)') if e.diff_sha256 else '-'} | "
            f"`{_short(e.version_digest)}` | {e.status} |"
        )
    out.append("")
    return "\n".join(out)


def render_html(result: AuditResult) -> str:
    esc = html.escape
    ok = result.ok
    rows_sites = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(str(c))}</td>"
            for c in (
                s.site_id,
                "revoked" if s.revoked else "enrolled",
                ", ".join(s.key_ids),
                s.updates,
                s.last_sequence,
                ", ".join(s.conditions) or "-",
            )
        )
        + "</tr>"
        for s in result.sites
    )
    rows_entries = "".join(
        f"<tr class='{'bad' if e.status != 'ok' else ''}'>"
        + "".join(
            f"<td>{esc(str(c))}</td>"
            for c in (
                e.index,
                e.kind,
                format_time(e.timestamp),
                e.site_id or "-",
                e.sequence if e.sequence is not None else "-",
                e.base_size if e.base_size is not None else "-",
                ", ".join(e.conditions) or "-",
                f"{e.diff_sha256} ({e.diff_size} B)" if e.diff_sha256 else "-",
                e.version_digest or "-",
                e.status,
            )
        )
        + "</tr>"
        for e in result.entries
    )
    rows_findings = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(str(c))}</td>"
            for c in (
                f.failure_class,
                f.exit_code,
                f.entry_index if f.entry_index is not None else "-",
                f.reason_code,
                f.message,
            )
        )
        + "</tr>"
        for f in result.findings
    )
    findings = (
        "<h2>Findings</h2><table><tr><th>class</th><th>exit</th><th>entry</th><th>reason</th>"
        f"<th>message</th></tr>{rows_findings}</table>"
        if result.findings
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scarches-fl ledger audit</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:110em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.2em .5em;
font-size:90%;text-align:left}}.verdict{{padding:.6em;font-weight:bold;
background:{'#d9f2d9' if ok else '#f8d0d0'}}}tr.bad{{background:#fbe3e3}}code{{font-size:90%}}
</style></head><body>
<h1>scarches-fl ledger audit</h1>
<p class="verdict">{esc(_verdict_line(result))}</p>
<ul>
<li>Source: {esc(result.source)}</li>
<li>Origin: <code>{esc(result.origin)}</code></li>
<li>Checkpoint: size {result.tree_size}, root <code>{esc(result.root_hex)}</code></li>
<li>Audited at: {esc(format_time(result.audited_at))} ({result.seconds:.2f} s)</li>
<li>Served model: <code>{esc(result.served_digest or '-')}</code></li>
<li>Replayed model: <code>{esc(result.replay_digest or '-')}</code></li>
<li>Witness cosignatures: {len(result.witnesses)} {esc(', '.join(result.witnesses))}</li>
</ul>
{findings}
<h2>Sites</h2>
<table><tr><th>site</th><th>status</th><th>keys</th><th>updates</th><th>last sequence</th>
<th>conditions</th></tr>{rows_sites}</table>
<h2>History</h2>
<table><tr><th>#</th><th>kind</th><th>time</th><th>site</th><th>seq</th><th>base</th>
<th>conditions</th><th>diff</th><th>version digest</th><th>status</th></tr>{rows_entries}</table>
</body></html>
"""


def render_json(result: AuditResult) -> str:
    return json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n"


def write_report(result: AuditResult, path: str | Path) -> Path:
    """Write the report; the format follows the extension (.html/.htm, .md/.markdown, .json)."""
    from protocols.errors import ConfigError

    p = Path(path)
    ext = p.suffix.lower()
    if ext in (".html", ".htm"):
        text = render_html(result)
    elif ext in (".md", ".markdown"):
        text = render_markdown(result)
    elif ext == ".json":
        text = render_json(result)
    else:
        raise ConfigError(
            f"--report {p}: unknown report format {ext!r}; name the file .html, .md or .json"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)
    return p
