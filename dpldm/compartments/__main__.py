"""python -m dpldm.compartments train|add|sample|forget|attribute|evaluate [--help]"""

from __future__ import annotations

import sys

from dpldm.compartments import attribute, evaluate, forget, sample, train

COMMANDS = {"train": train.main, "add": train.main_add, "sample": sample.main, "forget": forget.main,
            "attribute": attribute.main, "evaluate": evaluate.main}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m dpldm.compartments {{{'|'.join(COMMANDS)}}} [--help]\n\n"
                         + (sys.modules["dpldm.compartments"].__doc__ or ""))
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
