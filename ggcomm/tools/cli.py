"""The ``ggcomm`` command: ``ggcomm <command> [options]``.

Each command lives in its own module with a ``main(argv)`` of its own, so ``ggcomm --help``
stays fast and a command's heavy imports (torch.distributed, plotting) load only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ggcomm.tools.demo", "train a GPT on 2 local ranks with plain DDP and with ggcomm, "
                            "side by side"),
    "bench": ("ggcomm.tools.bench", "DDP comm hooks side by side on localhost and shaped links"),
    "analyze": ("ggcomm.tools.analyze",
                "GG vs Gaussian fits and FL/EG/Huffman bits of GPT tensors"),
}


def _usage() -> str:
    width = max((len(n) for n in COMMANDS), default=0)
    lines = ["usage: ggcomm <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'ggcomm <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"ggcomm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ggcomm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
