"""Fine-tune function vectors: ``python train.py --config configs/toy.yaml`` (docs/usage.md).

The same command as ``mfv train``: short ``--help`` without importing torch (``--help full``:
every option), ``--threads N``, one-line errors with suggestions."""

import sys

if __name__ == "__main__":
    from mfv.cli import main

    main(["train", *sys.argv[1:]])
