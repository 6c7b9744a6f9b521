"""``python -m mfv.data.gqa prepare ...`` (see :mod:`mfv.data.gqa.prepare`)."""

from mfv.data.gqa.prepare import main

main()
