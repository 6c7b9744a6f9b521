"""Hugging Face vision-language families, one small mostly declarative file each.

Each file holds a :class:`mfv.models.hf.Family` (``FAMILY``), its loader (``load``) and a
tiny random stand-in built offline (``tiny``); one registry entry in :mod:`mfv.models`
names them. The adapter itself is :class:`mfv.models.hf.HFAdapter`, shared by all.
"""
