"""Evaluate FVs: ``python evaluate.py --config configs/toy.yaml --out runs/eval [--fv F] [--limit N]``.

The same command as ``mfv evaluate``: short ``--help`` without importing torch (``--help full``:
every option), ``--threads N``, one-line errors with suggestions."""

import sys

if __name__ == "__main__":
    from mfv.cli import main

    main(["evaluate", *sys.argv[1:]])
