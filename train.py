"""Fine-tune function vectors: ``python train.py --config configs/toy.yaml`` (see README)."""

from mfv.commands.train import main

if __name__ == "__main__":
    main()
