"""`moechat models`: the catalogue and the downloaded models, and whether each runs here.

Works offline: what is local comes from the Hugging Face cache, and "fits / decode tok/s"
comes from the planner on the model's GGUF header — read from disk for downloaded models;
for the others only with `--plan`, which reads each header over HTTP (a few MB each).
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "list catalogue and downloaded models: size, quant, architecture, fits here, predicted tok/s"

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    parser.add_argument("--local", action="store_true", help="only downloaded models")
    parser.add_argument("--plan", action="store_true",
                        help="also plan models not downloaded (reads their GGUF headers over HTTP)")


def run(args: argparse.Namespace) -> int:
    rows = [row for row in list_models(remote_headers=args.plan) if row["local"] or not args.local]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows)
    return 0


def list_models(remote_headers: bool = False) -> list[dict]:
    """One dict per catalogue quant, then per downloaded GGUF that is not in the catalogue."""
    from moechat.backends.model import hub
    from moechat.backends.model.catalogue import load_catalogue

    rows, seen = [], set()
    for entry in load_catalogue().values():
        for quant in entry.quants.values():
            path = hub.local_model(quant.repo, list(quant.files))
            seen.add((quant.repo, quant.files[0]))
            rows.append(_row(
                name=f"{entry.name}:{quant.quant}", quant=quant.quant, family=entry.family,
                architecture=entry.architecture, repo=quant.repo, files=list(quant.files),
                path=path, size_bytes=hub.local_bytes(quant.repo, list(quant.files)) if path
                else quant.size_bytes, approx_size_gb=quant.approx_size_gb,
                params_total_b=entry.params_total_b, params_active_b=entry.params_active_b,
                context_length=entry.context_length, license=entry.license, source=quant.source,
            ))
    for repo, filename, path in hub.cached_ggufs():
        if (repo, filename) in seen:
            continue
        files = hub.model_files(filename)
        rows.append(_row(name=f"{repo}:{filename}", quant=None, family=None, architecture=None,
                         repo=repo, files=files, path=path, size_bytes=hub.local_bytes(repo, files)))
    for row in rows:
        _add_plan(row, remote_headers)
    return rows


ROW_DEFAULTS = {"approx_size_gb": None, "params_total_b": None, "params_active_b": None,
                "context_length": None, "license": None, "source": None}


def _row(**fields) -> dict:
    path = fields.pop("path")
    return {**ROW_DEFAULTS, **fields, "local": path is not None, "path": str(path) if path else None,
            "fits": None, "decode_tok_s": None, "plan_error": None}


def _add_plan(row: dict, remote_headers: bool) -> None:
    from moechat.backends.errors import MoechatError
    from moechat.backends.model.model_card import read_model_card

    if not row["local"] and not remote_headers:
        return
    try:
        if row["local"]:
            card = read_model_card(row["path"])
        else:
            from moechat.backends.model import hub

            card = hub.read_remote_card(row["repo"], row["files"][0])
            row["size_bytes"] = card.file_bytes  # as the hub reports it
        row["architecture"] = row["architecture"] or card.architecture
        row["fits"], row["decode_tok_s"] = plan_columns(card)
    except MoechatError as err:
        row["plan_error"] = str(err)


def plan_columns(card) -> tuple[bool | None, float | None]:
    """(fits, predicted decode tok/s) of the planner's choice on this machine."""
    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.backends.plan.planner import make_plan

    choice = make_plan(card, load_profile()).choice
    return bool(choice.fits), round(float(choice.decode_tok_s), 1)


def _print_table(rows: list[dict]) -> None:
    header = ("NAME", "ARCH", "SIZE", "LOCAL", "FITS", "DECODE")
    lines = [header]
    for row in rows:
        if row["size_bytes"]:
            size = _size(row["size_bytes"])
        elif row["approx_size_gb"]:
            size = f"~{row['approx_size_gb']:.1f} GB"
        else:
            size = "?"
        fits = {True: "yes", False: "no", None: "?"}[row["fits"]]
        decode = f"{row['decode_tok_s']:.1f} tok/s" if row["decode_tok_s"] is not None else "?"
        lines.append((row["name"], row["architecture"] or "?", size,
                      "yes" if row["local"] else "-", fits, decode))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    errors = [row for row in rows if row["plan_error"]]
    for row in errors:
        print(f"moechat: {row['name']}: {row['plan_error']}", file=sys.stderr)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
