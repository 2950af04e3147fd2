"""`moechat rm NAME[:QUANT]`: delete a downloaded model (every shard, partial downloads too)."""

from __future__ import annotations

import argparse

HELP = "delete a downloaded model (catalogue NAME[:QUANT] or org/repo:file.gguf)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="catalogue NAME[:QUANT] or org/repo:file.gguf")


def run(args: argparse.Namespace) -> int:
    from moechat.backends.errors import MoechatError
    from moechat.backends.model.model_resolve import lookup

    ref = lookup(args.model)
    if not ref.on_hub:
        raise MoechatError(f"{args.model}: rm deletes models fetched with `moechat pull`, not local files")
    from moechat.backends.model import hub

    freed = hub.remove(ref.repo, list(ref.files))
    if not freed and ref.local is None:
        raise MoechatError(f"{args.model} is not downloaded")
    print(f"removed {ref.catalogue_name or args.model} ({freed / 1e9:.2f} GB freed)")
    return 0
