"""A quiet console: the known noise of Lightning, jsonargparse and litlogger that a user of
mfv cannot act on, silenced where it is raised and nothing else.

:func:`quiet` is called once by every command before its parser is built. Each entry below
names exactly one message (a regex anchored at its start, as :mod:`warnings` matches it) and
why it is noise for mfv; any other warning, including other warnings of the same category
from the same library, still reaches the user.
"""

from __future__ import annotations

import functools
import logging
import warnings

# (message regex, category, why it is noise here)
NOISE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning,
     "mfv's commands hand LightningCLI their own argument list on purpose (mfv seeds, mfv demo, the API)"),
    (r"\s*Unable to serialize instance <mfv\.training\.callbacks\.AtomicCheckpointIO ", UserWarning,
     "jsonargparse (JsonargparseWarning) cannot write mfv's own checkpoint plugin into config.yaml; "
     "train.py always adds it, so the saved config needs no entry for it"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "torch deprecates a class that Lightning's own pytree helper still builds"),
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning,
     "the backbone is frozen and in eval mode by design; only the function vectors train"),
)

# Logger name -> start of the one record dropped from it.
NOISE_LOGS: dict[str, str] = {
    # Lightning's rank_zero_info goes through whichever of these two modules was imported last.
    "lightning.pytorch.utilities.rank_zero": "💡 Tip: For seamless cloud logging and experiment tracking, try "
                                             "installing [litlogger]",
    "lightning.fabric.utilities.rank_zero": "💡 Tip: For seamless cloud logging and experiment tracking, try "
                                            "installing [litlogger]",
}


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _install_log_filters() -> None:
    for name, prefix in NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def _metrics_without_version(progress_bar, trainer, module) -> dict:
    """The progress bar's items without ``v_num`` (Lightning's documented override; the run
    folder is printed at the end of the run)."""
    items = type(progress_bar).get_metrics(progress_bar, trainer, module)
    items.pop("v_num", None)
    return items


def _hide_version(trainer) -> None:
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or isinstance(bar.__dict__.get("get_metrics"), functools.partial):
        return
    # A partial of a module-level function keeps the trainer picklable (ddp_spawn).
    bar.get_metrics = functools.partial(_metrics_without_version, bar)


def quiet(trainer=None) -> None:
    """Silences the known noise (idempotent; cheap: imports no library).

    Args:
        trainer: A built ``lightning.Trainer``: its progress bar also stops showing the
            logger's ``v_num``.
    """
    for message, category, _ in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    _install_log_filters()
    if trainer is not None:
        _hide_version(trainer)

