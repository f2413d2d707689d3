"""`turbo-serve` command line: each subcommand lives in its own module, imported only when used
(so `turbo-serve generate` never imports Ray)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "generate": ("turbo_serve.pipeline.offline", "generate one video in this process"),
    "serve": ("turbo_serve.serving.launch", "start local Ray and the Serve application"),
    "loadtest": ("turbo_serve.loadtest.runner", "drive the HTTP API with locust and report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(prog="turbo-serve", description=__doc__)
    top.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command = top.parse_args(argv[:1]).command
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"turbo-serve {command}", description=COMMANDS[command][1])
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
