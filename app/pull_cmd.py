"""`moechat pull NAME[:QUANT]`: download a model into the Hugging Face cache.

Takes a catalogue name (models.toml) or a hub file `org/repo:file.gguf`. Shows a progress
bar, resumes an interrupted download, verifies size and sha256, fetches every shard of a
split GGUF, and prints the local path of the (first) file on stdout.
"""

from __future__ import annotations

import argparse
import sys

HELP = "download a model (catalogue NAME[:QUANT] or org/repo:file.gguf) with resume and checks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="catalogue NAME[:QUANT] (see `moechat models`) or org/repo:file.gguf")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from moechat.backends.errors import MoechatError
    from moechat.backends.model.model_resolve import lookup

    ref = lookup(args.model)
    if not ref.on_hub:
        raise MoechatError(f"{args.model} is a local file; pull takes a catalogue name or org/repo:file.gguf")
    from moechat.backends.model import hub

    if ref.local is None:
        sha = ref.sha256 or (None,) * len(ref.files)
        size = ref.size_bytes if len(ref.files) == 1 else None  # the catalogue's, checked up front
        files = [hub.HubFile(ref.repo, name, size=size, sha256=digest) for name, digest in zip(ref.files, sha)]
        try:
            path = hub.download(files, progress=not args.quiet)[0]
        except KeyboardInterrupt:
            print(f"\nmoechat: pull interrupted; run `moechat pull {args.model}` again to resume",
                  file=sys.stderr)
            raise
        what = "pulled"
    else:
        path, what = ref.local, "already downloaded"
    size = hub.local_bytes(ref.repo, list(ref.files))
    if not args.quiet:
        print(f"{what} {ref.catalogue_name or args.model} ({size / 1e9:.2f} GB)", file=sys.stderr)
    print(path)
    return 0
