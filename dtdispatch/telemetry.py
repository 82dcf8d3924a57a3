"""Telemetry without code changes: merge the per-rank files of a ``DTDISPATCH_TELEMETRY=DIR`` run.

With ``DTDISPATCH_TELEMETRY=DIR`` in the environment when dtdispatch is imported, the process
writes ``dtdispatch.stats()`` (plus rank, world size, pid, host, torch version, implementation) to
``DIR/dtdispatch-rank{R}-of-{W}-pid{PID}.json`` when it exits normally (``atexit``; a process
killed by a signal or ended by ``os._exit`` writes nothing). ``python -m dtdispatch.telemetry DIR``
merges the files of a run: totals, hit rate, a per-op table with the top misses first, bailouts by
reason, one line per rank, and ``--png FILE`` for a chart (needs matplotlib).

Rank and world size come from, in order: the default process group if it is still initialized at
exit; the process group seen when ``accelerate`` ran (scripts often destroy the group before
exit); the launcher's environment (``RANK``/``WORLD_SIZE`` from torchrun, ``PMI_RANK``/``PMI_SIZE``
from MPICH, ``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_SIZE`` from Open MPI); else 0 of 1.
The file says which (``rank_source``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtdispatch import _telemetry
from dtdispatch._telemetry import ENV, FORMAT, PATTERN

__all__ = ["TelemetryError", "load", "main", "merge", "plot", "report"]


_REQUIRED = ("rank", "world_size", "pid", "host", "torch_version", "implementation", "stats")


class TelemetryError(Exception):
    """A telemetry directory that cannot be merged (missing, empty, unreadable, malformed)."""


def load(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a run's telemetry files.

    Args:
        directory: the ``DTDISPATCH_TELEMETRY`` directory of a run.

    Returns:
        Its records (one dict per process file), by rank then pid.

    Raises:
        TelemetryError: the directory is missing or holds no record, or one cannot be read.
    """
    root = Path(directory)
    if not root.is_dir():
        raise TelemetryError(
            f"{root} is not a directory: pass the DIR that {ENV}=DIR named for the run"
        )
    try:
        paths = sorted(root.glob(PATTERN))
    except OSError as exc:
        raise TelemetryError(f"cannot list {root}: {exc}") from exc
    if not paths:
        raise TelemetryError(
            f"no telemetry files ({PATTERN}) in {root}: run the job with {ENV}={root} set and let "
            "its processes exit normally"
        )
    records = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TelemetryError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TelemetryError(f"{path} is not a {FORMAT} record")
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise TelemetryError(f"{path} lacks {missing}: not written by dtdispatch's writer?")
        data["file"] = path.name
        records.append(data)
    return sorted(records, key=lambda r: (r["rank"], r["pid"]))


def _sum_tree(total: Any, part: Any) -> Any:
    """Numbers add up; dicts merge key by key (unknown sections included); any other value is kept
    once, a tuple of the distinct values when files disagree (JSON never makes a tuple)."""
    if isinstance(total, dict) and isinstance(part, dict):
        merged = dict(total)
        for key, value in part.items():
            merged[key] = _sum_tree(merged[key], value) if key in merged else value
        return merged
    if _is_number(total) and _is_number(part):
        return total + part
    if total == part:
        return total
    values = total if isinstance(total, tuple) else (total,)
    return values if part in values else (*values, part)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum the stats of a run's records.

    Args:
        records: records as ``load`` returns them.

    Returns:
        One stats dict: every numeric leaf of every section (known or not) summed over records.
    """
    total: dict[str, Any] = {}
    for rec in records:
        total = _sum_tree(total, rec["stats"])
    return total


def _rate(hits: int, misses: int) -> str:
    return f"{100.0 * hits / (hits + misses):.1f}%" if hits + misses else "n/a"


def _numeric_leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, number) for every numeric leaf of ``tree``."""
    if isinstance(tree, dict):
        return [
            leaf
            for key, value in tree.items()
            for leaf in _numeric_leaves(value, f"{prefix}{key}.")
        ]
    return [(prefix[:-1], tree)] if _is_number(tree) else []


# The sections the report lays out itself; any other section of stats() is listed as summed leaves.
_KNOWN = frozenset(
    ("hits", "misses", "entries", "evictions", "bailouts", "per_op", "bailouts_per_op", "threads",
     "implementation")
)


def _ops_by_misses(total: dict[str, Any]) -> list[tuple[str, dict[str, int]]]:
    per_op: dict[str, dict[str, int]] = total.get("per_op", {})
    return sorted(
        per_op.items(), key=lambda kv: (-kv[1]["misses"], -kv[1]["bailouts"], -kv[1]["hits"], kv[0])
    )


def report(records: Sequence[dict[str, Any]], *, top: int = 20) -> str:
    """Describe a run as text.

    Args:
        records: records as ``load`` returns them.
        top: how many ops the per-op table lists (0: all).

    Returns:
        Header, totals, per-op table (top misses first), bailouts by reason, one line per rank.
    """
    total = merge(records)
    ranks = sorted({r["rank"] for r in records})
    worlds = sorted({r["world_size"] for r in records})
    torches = ", ".join(sorted({r["torch_version"] for r in records}))
    impls = ", ".join(sorted({r["implementation"] for r in records}))
    lines = [
        f"dtdispatch telemetry: {len(records)} file(s), ranks {ranks} of world size "
        f"{'/'.join(map(str, worlds))}, torch {torches}, implementation {impls}"
    ]
    if len(worlds) > 1 or ranks != list(range(worlds[0])) or len(records) != len(ranks):
        lines.append(
            f"WARNING: {len(records)} file(s) for ranks {ranks} with world sizes {worlds}: files "
            "missing or from several runs (use one DIR per run)"
        )
    bailouts = sum(total.get("bailouts", {}).values())
    lines.append(
        f"totals: hits={total.get('hits', 0)} misses={total.get('misses', 0)} "
        f"bailouts={bailouts} entries={total.get('entries', 0)} "
        f"evictions={total.get('evictions', 0)} "
        f"hit rate={_rate(total.get('hits', 0), total.get('misses', 0))}"
    )
    ops = _ops_by_misses(total)
    shown = ops if top <= 0 else ops[:top]
    lines.append("")
    lines.append(f"per op ({len(shown)} of {len(ops)}, most misses first):")
    width = max([len("op"), *(len(op) for op, _ in shown)])
    lines.append(f"  {'op':<{width}}  {'hits':>8}  {'misses':>8}  {'bailouts':>8}  {'hit rate':>8}"
                 "  bailouts by reason")
    by_op = total.get("bailouts_per_op", {})
    for op, c in shown:
        reasons = ", ".join(
            f"{reason}: {n}" for reason, n in sorted(by_op.get(op, {}).items(), key=lambda x: -x[1])
        )
        lines.append(
            f"  {op:<{width}}  {c['hits']:>8}  {c['misses']:>8}  {c['bailouts']:>8}  "
            f"{_rate(c['hits'], c['misses']):>8}  {reasons}"
        )
    lines.append("")
    lines.append("bailouts by reason:")
    for reason, n in sorted(total.get("bailouts", {}).items(), key=lambda x: -x[1]):
        lines.append(f"  {reason}: {n}")
    others = [key for key in total if key not in _KNOWN]
    for key in others:
        leaves = ", ".join(f"{name}={value}" for name, value in _numeric_leaves(total[key]))
        lines.append(f"section {key} (summed over files): {leaves or '(no numbers)'}")
    lines.append("")
    lines.append("per rank:")
    for rec in records:
        s = rec["stats"]
        lines.append(
            f"  rank {rec['rank']}/{rec['world_size']} pid {rec['pid']} on {rec['host']} "
            f"({rec['implementation']}, torch {rec['torch_version']}): hits={s['hits']} "
            f"misses={s['misses']} bailouts={sum(s['bailouts'].values())} "
            f"entries={s['entries']} evictions={s['evictions']} "
            f"hit rate={_rate(s['hits'], s['misses'])}"
        )
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, top: int = 20) -> None:
    """Draw a run as a PNG: hits, misses and bailouts of the top ops (by misses), and each rank's
    hit rate.

    Args:
        records: records as ``load`` returns them.
        path: the PNG file to write.
        top: how many ops to draw (0: all).

    Raises:
        TelemetryError: matplotlib is missing or ``path`` cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise TelemetryError(
            f"--png needs matplotlib ({exc}); install it with pip install 'dtdispatch[plot]'"
        ) from exc
    total = merge(records)
    ops = _ops_by_misses(total)[: top if top > 0 else None]
    fig, (ax_ops, ax_ranks) = plt.subplots(
        1, 2, figsize=(14, max(3.0, 0.35 * len(ops) + 1.5)), width_ratios=[3, 1]
    )
    ops.reverse()  # barh draws bottom-up: the most misses end on top
    names = [op for op, _ in ops]
    for i, (field, color) in enumerate(
        (("hits", "tab:green"), ("misses", "tab:red"), ("bailouts", "tab:orange"))
    ):
        ax_ops.barh(
            [y + (i - 1) * 0.27 for y in range(len(ops))],
            [counts[field] for _, counts in ops],
            height=0.27,
            color=color,
            label=field,
        )
    ax_ops.set_yticks(range(len(names)), names, fontsize=7)
    ax_ops.set_xlabel("calls (all ranks)")
    ax_ops.set_title("per op, most misses on top")
    ax_ops.legend()
    labels = [f"rank {r['rank']}\npid {r['pid']}" for r in records]
    rates = [
        100.0 * r["stats"]["hits"] / max(1, r["stats"]["hits"] + r["stats"]["misses"])
        for r in records
    ]
    ax_ranks.bar(labels, rates, color="tab:blue")
    ax_ranks.set_ylim(0, 100)
    ax_ranks.set_ylabel("hit rate (%)")
    ax_ranks.set_title("per rank")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise TelemetryError(f"cannot write {path}: {exc}") from exc
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line ``python -m dtdispatch.telemetry DIR [--top N] [--png FILE]``: prints
    ``report`` (and writes the ``plot``).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 1 after a message on stderr (a ``TelemetryError``).
    """
    # NOTE: the merge process imported dtdispatch too; with DTDISPATCH_TELEMETRY still exported it
    # would add its own (empty) record to the directory it is reading.
    _telemetry.disarm()
    parser = argparse.ArgumentParser(
        prog="python -m dtdispatch.telemetry",
        description=f"Merge the per-rank files that {ENV}=DIR made a job write.",
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--top", type=int, default=20, help="ops in the table (0: all)")
    parser.add_argument("--png", metavar="FILE", help="also draw a chart into FILE")
    args = parser.parse_args(argv)
    try:
        records = load(args.directory)
        print(report(records, top=args.top))
        if args.png:
            plot(records, args.png, top=args.top)
            print(f"chart written to {args.png}")
    except TelemetryError as exc:
        print(f"dtdispatch telemetry: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
