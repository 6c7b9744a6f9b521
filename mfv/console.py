"""A quiet console: the known noise of Lightning, jsonargparse and litlogger that a user of
mfv cannot act on, silenced where it is raised and nothing else; progress bars that are one
bar per stage, and plain lines in a log.

:func:`quiet` is called once by every command before its parser is built. Each entry below
names exactly one message (a regex anchored at its start, as :mod:`warnings` matches it) and
why it is noise for mfv; any other warning, including other warnings of the same category
from the same library, still reaches the user.

Progress: on a terminal, bars redraw in place. Written to a file or a pipe (a log, CI) a bar
redrawn in place is a run of carriage returns and cursor escapes; there every bar (mfv's,
:func:`progress`, and Lightning's, through :func:`quiet` with the trainer) writes plain lines
instead, at most one per :data:`PLAIN_INTERVAL_S` seconds per bar, and its last state.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
import warnings
from typing import Any, Iterable, TextIO

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


PLAIN_INTERVAL_S = 30.0  # a bar in a log writes a line at most this often (and its final state)
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PlainLines:
    """A stream for one progress bar that turns its in-place redraws into plain lines: carriage
    returns and escape codes dropped, one line per :data:`PLAIN_INTERVAL_S` at most (a finished
    bar's ``100%`` line always)."""

    def __init__(self, stream: TextIO, interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.stream, self.interval_s, self._last, self._finished = stream, interval_s, float("-inf"), False

    def write(self, text: str) -> None:
        line = _ESCAPES.sub("", text).replace("\r", "").strip()
        if not line:
            return
        finished, now = "100%" in line, time.monotonic()
        # A finished bar's line once (tqdm redraws it on close); a restarted bar (Lightning's
        # next epoch) writes again.
        if (finished and not self._finished) or (not finished and now - self._last >= self.interval_s):
            self.stream.write(line + "\n")
            self._last = now
        self._finished = finished

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def plain_output(stream: TextIO | None = None) -> bool:
    """Whether bars on ``stream`` (default stderr) are to be plain lines: it is not a terminal."""
    stream = sys.stderr if stream is None else stream
    return not (hasattr(stream, "isatty") and stream.isatty())


def progress(iterable: Iterable | None = None, file: TextIO | None = None, **options: Any) -> Any:
    """A tqdm bar (``tqdm.auto.tqdm``'s options; on ``file``, default stderr) that writes plain
    lines where ``file`` is not a terminal."""
    from tqdm.auto import tqdm

    file = sys.stderr if file is None else file
    return tqdm(iterable, file=PlainLines(file) if plain_output(file) else file, **options)


def _plain_lightning_bar(progress_bar, name: str):
    # Lightning builds its bars on sys.stdout, and draws them once as they are built.
    stdout = sys.stdout
    sys.stdout = PlainLines(stdout)
    try:
        return getattr(type(progress_bar), name)(progress_bar)
    finally:
        sys.stdout = stdout


def _plain_lightning_bars(trainer) -> None:
    """Where stdout is not a terminal, Lightning's bar is a tqdm one writing plain lines (its
    rich bar, the default where rich is installed, writes nothing to a log until the run ends)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not plain_output(sys.stdout):
        return
    if not isinstance(bar, TQDMProgressBar):
        plain = TQDMProgressBar()
        trainer.callbacks[trainer.callbacks.index(bar)] = plain
        bar = plain
    for name in ("init_sanity_tqdm", "init_train_tqdm", "init_validation_tqdm", "init_test_tqdm",
                 "init_predict_tqdm"):
        if not isinstance(bar.__dict__.get(name), functools.partial):
            # A partial of a module-level function keeps the trainer picklable (ddp_spawn).
            setattr(bar, name, functools.partial(_plain_lightning_bar, bar, name))


def quiet(trainer=None) -> None:
    """Silences the known noise (idempotent; cheap: imports no library).

    Args:
        trainer: A built ``lightning.Trainer``: its progress bar also stops showing the
            logger's ``v_num``, and writes plain lines where stdout is not a terminal.
    """
    for message, category, _ in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    _install_log_filters()
    if trainer is not None:
        _plain_lightning_bars(trainer)
        _hide_version(trainer)

