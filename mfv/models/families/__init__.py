"""Hugging Face vision-language families, one small mostly declarative file each.

Each family file holds a :class:`mfv.models.hf.Family` (``FAMILY``): where things are, its
release's ``config.json`` and how its stand-in is reduced and built offline
(:mod:`mfv.models.families.release`). The registry (:mod:`mfv.models`) finds every ``FAMILY``
here and registers ``<name>`` (the loader, :func:`mfv.models.hf.load_family`) and
``<name>-random`` (the stand-in); :mod:`mfv.models.families.refused` names the architectures
refused at load, with why. The adapter itself is :class:`mfv.models.hf.HFAdapter`, shared by all.
"""
