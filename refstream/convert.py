"""``refstream convert SRC DST``: the official VideoGLaMM folder into RefStream's safetensors layout.

The command line of :func:`workers.convert.convert_checkpoint` (the conversion itself lives with the model
code in ``workers/``; this module only parses and reports, so building the ``refstream`` parser loads no
torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from refstream.config import load_model_config
from refstream.errors import ConfigError


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``refstream convert SRC DST`` to an ``argparse`` sub-parser collection; returns the parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert the VideoGLaMM download folder into RefStream's safetensors layout (fast, mmap loads)",
        description="Load the official VideoGLaMM folder SRC (config.json, pytorch_model-*.bin shards + index, "
                    "tokenizer) with the base weights named by --model (CLIP, InternVideo2 .pt, SAM2 when the "
                    "checkpoint has none), strictly, and write one self-contained safetensors folder DST. "
                    "Use DST as --checkpoint afterwards.",
    )
    p.add_argument("src", metavar="SRC", help="the official VideoGLaMM checkpoint folder")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--model", default="videoglamm", help="model preset or YAML naming the base weights (default videoglamm)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="tensor dtype on disk (auto: keep each file's dtype)")
    p.add_argument("--shard-size", default="4GB", help="largest shard size, e.g. 4GB or 500MB (default 4GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted folder at DST")
    return p


def run_convert(args: argparse.Namespace) -> int:
    """Run ``refstream convert``; prints a summary and returns 0.

    Raises:
        RefStreamError: (ConfigError / WeightsNotFoundError and subclasses) for the CLI to print (exit code 2).
    """
    from workers.convert import DTYPES, INDEX_FILE, convert_checkpoint, parse_size  # lazy: torch, transformers

    try:
        shard_bytes = parse_size(args.shard_size)
    except ValueError:
        raise ConfigError(f"--shard-size {args.shard_size!r} is not a size such as 4GB or 500MB") from None
    config = load_model_config(args.model, str(args.src))
    layout = convert_checkpoint(config, args.src, args.dst, dtype=DTYPES[args.dtype], shard_bytes=shard_bytes,
                                overwrite=args.overwrite)
    index = json.loads((Path(args.dst) / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    print(f"wrote {len(index['weight_map'])} tensors ({index['metadata']['total_size'] / 1e9:.2f} GB, "
          f"dtype {layout['dtype'] or 'as in the sources'}) in {len(shards)} shard(s) to {args.dst}; "
          f"load it with --checkpoint {args.dst}", file=sys.stdout)
    return 0
