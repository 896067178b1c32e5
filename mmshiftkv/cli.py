"""The ``mmshiftkv`` console script: ``mmshiftkv <command> [options]``.

Commands: ``demo`` (every press on one image, known answers), ``eval`` (benchmarks, Tables 1-3), ``analyze``
(Fig. 1), ``profile`` (Fig. 3), ``calibrate`` (SparseMM head scores, MixKV redundancy).
``mmshiftkv <command> -h`` lists a command's options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, str] = {
    "demo": "every press at shrinking budgets answering known questions (offline trained model by default)",
    "eval": "evaluate presses x allocators x budgets on the paper's benchmarks (Tables 1-3)",
    "analyze": "prefill-vs-decode hidden-state statistics and decode attention coverage (Fig. 1)",
    "profile": "decode ms/token and peak memory vs input length (Fig. 3)",
    "calibrate": "compute SparseMM visual-head scores (or MixKV redundancy scores) for a model",
}


def _command(name: str) -> Callable[[Sequence[str]], int | None]:
    # imported on demand: a command loads only the modules it runs
    if name == "demo":
        from mmshiftkv.demo import main
    elif name == "calibrate":
        from mmshiftkv.evaluation.calibrate import main
    else:
        from mmshiftkv.evaluation import cli

        main = {"eval": cli.eval_main, "analyze": cli.analyze_main, "profile": cli.profile_main}[name]
    return main


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mmshiftkv <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "mmshiftkv <command> -h shows the options of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"mmshiftkv: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    status = _command(name)(rest)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
