"""Evaluate FVs: ``python evaluate.py --config configs/toy.yaml --out runs/eval [--fv F] [--limit N]``."""

from mfv.commands.evaluate import main

if __name__ == "__main__":
    main()
