"""The `encodec-jax` command line: a thin layer of argument parsing over the library."""

from __future__ import annotations

import argparse
import os
import sys


def _add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    parser.add_argument(
        "--local-files-only", action="store_true", help="use the Hub cache only (offline)"
    )


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    kind = convert(
        args.src,
        args.out,
        to=args.to,
        force=args.force,
        preset=args.preset,
        config_file=args.config,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
    )
    print(f"converted {kind} checkpoint {args.src} -> {args.out} ({args.to})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encodec-jax", description="EnCodec neural audio codec in JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert a PyTorch checkpoint (transformers, audiocraft, encodec .th)",
        description="Convert an EnCodec checkpoint into a directory encodec-jax loads without "
        "torch. SRC: a transformers directory or Hub id, audiocraft's "
        "compression_state_dict.bin, or an encodec package .th file.",
    )
    convert.add_argument("src", help="checkpoint file, directory or Hub id")
    convert.add_argument("out", help="output directory (must not exist unless --force)")
    convert.add_argument(
        "--to",
        choices=["encodec-jax", "transformers"],
        default="encodec-jax",
        help="output layout; both load in encodec-jax and transformers (default: encodec-jax)",
    )
    convert.add_argument("--force", action="store_true", help="replace an existing OUT")
    convert.add_argument(
        "--preset", default=None, help="architecture of a .th file: 24khz, 32khz or 48khz"
    )
    convert.add_argument("--config", default=None, help="architecture of a .th file: config.json")
    _add_hub_options(convert)
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("encodec-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line for the user, never a traceback
        if os.environ.get("ENCODEC_JAX_TRACEBACK"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"encodec-jax {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
