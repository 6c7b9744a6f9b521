"""One preflight before any compute, shared by every entry point.

``train.py`` and ``evaluate.py`` (and so ``mfv seeds``, which runs them) build their model,
data and trainer from the parsed settings, then call :func:`plan_training` or
:func:`plan_evaluation` before the AIE or any other compute. These resolve the run plan
(:class:`RunPlan`: which splits are read and what for, which files are read, which folders
are written) and check it. Which splits a step reads, with what shots and prompt prefixes,
its own room states (:mod:`mfv.requirements`: the evaluation protocol, the extraction, the
data's scenes per relation through its sampler); the preflight asks and checks:

* settings against the backbone and the data (``aie.*`` ranges, ``val_fraction`` where a
  validation part is used, relation names identical in model and data);
* files read: a ``--ckpt_path`` is a readable train.py checkpoint of this run's backbone,
  relations in this order, layer and injection, holding finite FVs
  (:meth:`~mfv.training.module.FunctionVectorModule.check_checkpoint`); an FV file is
  whole, finite and fits the backbone and the relations;
* outputs: every folder written is writable and its disk has room (:func:`mfv.io.check_writable`);
* data (:func:`check_data`): the splits are prepared (generated if synthetic); every image
  an episode of a used split can show opens and decodes; every relation has prompts in every
  split it is used on, and in the first N prompts wherever only N are taken (``--limit``,
  the AIE's prompt counts); the split holds enough scenes for the prompts' shots; the
  tokenizer knows every answer's first token (and, for a closed object set, no two answers
  share one). It returns each split's content fingerprint (image bytes included), which runs
  record as provenance.

Every check raises an :class:`~mfv.errors.MfvError` with one line naming the field or file and
what to do; :func:`exit_on_bad_input` is the one place that turns it into ``error: ...`` on
stderr and exit status 2.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mfv.errors import ConfigError, DataError, MfvError
from mfv.requirements import SplitUse
from mfv.io import UnsafeFileError, check_writable, load_checkpoint
from mfv.runs import check_resume, shaping_settings

EVALUATION_OUTPUT_BYTES = 16 * 2**20  # metrics.json, report.md, figures, TensorBoard
RUN_OUTPUT_BYTES = 8 * 2**20  # metrics.json, heatmaps, config, TensorBoard (besides checkpoints)


@contextmanager
def exit_on_bad_input(*also: type[BaseException]) -> Iterator[None]:
    """Bad input (an :class:`MfvError`, or one of ``also``) becomes one ``error: ...`` line on
    stderr and exit status 2, never a traceback."""
    try:
        yield
    except (MfvError, *also) as exc:
        from mfv.usage import plain_message  # jsonargparse's wrapper off, the option named as set

        print(f"error: {one_line(plain_message(exc))}", file=sys.stderr)
        raise SystemExit(2) from exc


def one_line(exc: BaseException | str, limit: int = 1500) -> str:
    """``exc`` as one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RunPlan:
    """What a run reads and writes, resolved and checked before any compute.

    Attributes:
        relations: The run's relations, in FV row order.
        splits: split -> how it is used.
        outputs: setting -> folder written.
        fingerprints: split -> content fingerprint (table, sampling and image bytes).
        finetuned: The ``--fv`` vectors, loaded and checked (evaluation).
        fv_data_mismatch: split -> (fingerprint the ``--fv`` file records, this run's), where they differ.
        resume_changes: What differs from the run ``--ckpt_path`` resumes, allowed by
            ``--allow_changed_data`` (:func:`mfv.runs.check_resume`).
    """

    relations: list[str]
    splits: dict[str, SplitUse]
    outputs: dict[str, Path]
    fingerprints: dict[str, str]
    finetuned: Any = None
    fv_data_mismatch: dict[str, list[str]] = field(default_factory=dict)
    resume_changes: dict[str, list[str]] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """The data facts an exported FV file records."""
        out: dict[str, Any] = {"data_fingerprints": dict(self.fingerprints)}
        if "eval" in self.fingerprints:
            out["data_fingerprint"] = self.fingerprints["eval"]
        return out


# ----- single checks -----------------------------------------------------------------------

def check_outputs(outputs: dict[str, tuple[str | Path, int]]) -> dict[str, Path]:
    """Each ``setting -> (folder, bytes it will receive)`` writable with room (creating nothing)."""
    return {name: check_writable(path, name, needed) for name, (path, needed) in outputs.items()}


def check_checkpoint(path: str | Path, module) -> dict:
    """``path`` is a readable train.py checkpoint that matches ``module`` (see
    :meth:`~mfv.training.module.FunctionVectorModule.check_checkpoint`); returns it."""
    path = Path(path)
    advice = "give --ckpt_path RUN/checkpoints/last.ckpt of the run to resume, or leave it unset"
    if not path.is_file():
        raise ConfigError(f"--ckpt_path {path}: no such file; {advice}")
    if path.stat().st_size == 0:
        raise ConfigError(f"--ckpt_path {path}: the file is empty (an interrupted write?); {advice}")
    try:
        checkpoint = load_checkpoint(path)  # tensors and plain data only: a hostile pickle is refused, never run
    except UnsafeFileError as exc:
        raise ConfigError(f"--ckpt_path {exc}; give a checkpoint train.py wrote") from None
    except Exception as exc:  # truncated zip, random bytes, another format
        raise ConfigError(f"--ckpt_path {path}: unreadable checkpoint ({type(exc).__name__}: {one_line(exc, 160)}); "
                          f"{advice}") from exc
    module.check_checkpoint(checkpoint, f"--ckpt_path {path}")
    return checkpoint


def check_vectors(path: str | Path, adapter, relations: list[str], name: str = "--fv"):
    """The FV file at ``path``, whole, finite, fitting ``adapter`` and holding every relation."""
    from mfv.method.function_vector import FunctionVectorSet

    try:
        fvs = FunctionVectorSet.load(path, adapter)
    except FileNotFoundError as exc:
        raise ConfigError(f"{name} {path}: no such file; give the function_vectors_finetuned.safetensors of a "
                          f"train.py run") from exc
    missing = [r for r in relations if r not in fvs.vectors]
    if missing:
        raise ConfigError(f"{name} {path}: has no vector for {missing} (it has {fvs.relations}); model.relations "
                          f"must be among the file's relations")
    return fvs


def check_relations_match(module, datamodule) -> list[str]:
    """The data's relations are the model's, by name and in order (rows of the FV table are
    indexed by the data's relation ids)."""
    relations = list(module.relations)
    data = list(getattr(datamodule, "relations", relations))
    if data != relations:
        raise ConfigError(f"data.init_args.relations resolves to {data} but model.relations is {relations}; list the "
                          f"relations by name in model.relations (train.py passes them to the data)")
    return relations


def check_images(datamodule, samplers: dict) -> None:
    """Every image an episode of the used splits can show opens and decodes."""
    from mfv.data.datamodule import SyntheticRelationDataModule
    from mfv.data.episodes import scan_images

    split_of: dict[str, str] = {}
    for split, sampler in samplers.items():
        for path in sampler.image_paths():
            split_of.setdefault(path, split)
    bad = [(path, record.problem) for path, record in scan_images(split_of).items() if record.problem]
    if not bad:
        return
    path, problem = bad[0]
    split = split_of[path]
    advice = (f"remove {datamodule.split_dir(split)} and it is generated again"
              if isinstance(datamodule, SyntheticRelationDataModule)
              else "restore or replace the image(s), or prepare the data again")
    raise DataError(f"{path}: {problem}; {len(bad)} of {len(split_of)} images of the "
                    f"{', '.join(sorted({split_of[p] for p, _ in bad}))} split(s) fail: {advice}")


def _first_covering(sampler, relations: list[str]) -> int | None:
    """The fewest first prompts covering every relation (None: some relation has none)."""
    needed = set(relations)
    for index, relation in enumerate(sampler.relations_of_prompts(len(sampler))):
        needed.discard(relation)
        if not needed:
            return index + 1
    return None


def check_split(datamodule, split: str, sampler, relations: list[str], use: SplitUse) -> None:
    """Relations present, shots possible and every prompt prefix covering every relation
    (``datamodule`` may be ``None`` for a sampler over your own scenes)."""
    if use.every_relation:
        present = {q.relation for q in sampler.queries}
        missing = [r for r in relations if r not in present]
        if missing:
            skipped = {r: n for r, n in getattr(sampler, "skipped", {}).items() if r in missing and n > 0}
            absent = [r for r in missing if r not in skipped]
            if absent:
                has = (datamodule.data_relations(split) if datamodule is not None
                       else sorted({s.relation for s in sampler.scenes()}))
                raise DataError(f"data: the {split} split ({use.purpose}) has no prompt of relation(s) {absent} of "
                                f"model.relations; the data has {has}: choose among those")
            if skipped:
                raise DataError(
                    f"data: relation(s) {sorted(skipped)} of model.relations have too few distinct images in the {split} "
                    f"split (relation: images) {skipped}; a {sampler.shots}-shot task needs {sampler.shots + 1}: "
                    f"drop them from model.relations or lower data.init_args.shots")
    if use.shots > sampler.max_shots():
        raise DataError(f"{use.shots_field} = {use.shots}: the {split} split ({use.purpose}) can give at most "
                        f"{max(sampler.max_shots(), 0)} demonstrations per prompt; lower it or give the split more "
                        f"images")
    for name, count in use.prompts.items():
        covered = sampler.relations_of_prompts(count)
        missing = [r for r in relations if r not in covered] if use.every_relation else []
        if missing:
            needed = _first_covering(sampler, relations)
            raise ConfigError(f"{name} = {count}: the first {count} prompts of the {split} split ({use.purpose}) "
                              f"leave out relation(s) {missing}, so its result would not cover every relation; "
                              f"use {name} >= {needed}")


def check_answers(adapter, samplers: dict, closed: bool = True) -> None:
    """The tokenizer knows every answer's first token; with a ``closed`` object set (the
    answers are names of a fixed set of objects) no two answers share one."""
    from mfv.data.datamodule import first_token_clashes, unknown_first_tokens

    scenes = [scene for sampler in samplers.values() for scene in sampler.scenes()]
    names = sorted({n for scene in scenes for n in scene.neighbours.values()})
    anchors = sorted({scene.anchor for scene in scenes})
    for kind, consequence, group in (("answers", "they could never be scored", names),
                                     ("objects the questions name", "the questions would not say what they ask about",
                                      anchors)):
        unknown = unknown_first_tokens(adapter, group)
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:40]) + (", ..." if len(unknown) > 40 else "")  # all, to fix at once
            raise DataError(f"data: {len(unknown)} of {len(group)} {kind} ({shown}) start with a token unknown to "
                            f"{adapter.backbone_id}'s tokenizer ({adapter.tokenizer.unk_token!r}), so {consequence}; "
                            f"use a backbone whose tokenizer knows them, or data without them"
                            + (" (the organism's words: model card, 'Vocabulary')" * (adapter.backbone_id == "openflamingo-organism")))
    clashes = first_token_clashes(adapter, names)
    if clashes and closed:
        raise DataError(f"data: answers share a first token under {adapter.backbone_id}'s tokenizer, so they cannot be "
                        f"told apart: {clashes[:4]}; rename or drop those objects")
    if clashes:
        warnings.warn(f"{len(clashes)} groups of answers share a first answer token under {adapter.backbone_id}'s "
                      f"tokenizer (scored on the first token, as the authors do), e.g. {clashes[:3]}", stacklevel=2)


def check_data(adapter, datamodule, relations: list[str], uses: dict[str, SplitUse]) -> dict[str, str]:
    """Prepares and checks every used split (module docstring); returns their fingerprints."""
    if "val" in uses and getattr(datamodule, "val_fraction", 1) <= 0:
        raise ConfigError(f"data.init_args.val_fraction = {datamodule.val_fraction}: the validation split "
                          f"({uses['val'].purpose}) is this part of the train split; give it a share in (0, 1), "
                          f"e.g. 0.2")
    datamodule.attach(adapter)
    try:
        datamodule.prepare_data()
    except MfvError:
        raise
    except Exception as exc:
        raise DataError(f"data: preparing the splits failed ({type(exc).__name__}: {one_line(exc, 200)})") from exc
    samplers = {}
    for split, use in uses.items():
        try:
            samplers[split] = datamodule.sampler(split)
        except MfvError as exc:
            raise DataError(f"data: the {split} split ({use.purpose}): {exc}") from exc
        except Exception as exc:
            raise DataError(f"{datamodule.split_dir(split)}: the {split} split cannot be read "
                            f"({type(exc).__name__}: {one_line(exc, 200)}); prepare the data again") from exc
    check_images(datamodule, samplers)
    for split, use in uses.items():
        check_split(datamodule, split, samplers[split], relations, use)
    check_answers(adapter, samplers, getattr(datamodule, "answers_closed", True))
    return {split: datamodule.fingerprint(split) for split in uses}


# ----- run plans -----------------------------------------------------------------------------

def check_extraction(adapter, data, aie) -> dict[str, str]:
    """One extraction (``mfv.extract``, ``mfv prepare-data``): settings, the cache folder and
    the data it reads, checked before any compute.

    Args:
        data: A relation DataModule (its ``eval`` split) or an
            :class:`~mfv.data.episodes.EpisodeSampler` over your own scenes.
        aie: The :class:`~mfv.method.extraction.AIESettings`.

    Returns:
        The fingerprint of the eval split (``{}`` for a sampler: see ``mfv.api``).
    """
    from mfv.data.episodes import EpisodeSampler
    from mfv.method.extraction import validate_extraction

    relations = list(data.relations)
    if isinstance(data, EpisodeSampler):
        aie.validate(adapter)
        aie.extraction_settings(relations, data.shots, data.seed).validate()
    else:
        validate_extraction(adapter, relations, data, aie)
    check_outputs({"aie.cache_dir": (aie.cache_dir, aie.cache_bytes(adapter, relations))})
    if not isinstance(data, EpisodeSampler):
        return check_data(adapter, data, relations, {"eval": aie.prompt_use(data.shots)})
    samplers = {"episodes": data}
    check_images(None, samplers)
    check_split(None, "episodes", data, relations, aie.prompt_use(data.shots))
    check_answers(adapter, samplers)
    return {}


def plan_training(cli) -> RunPlan:
    """train.py's plan: train, val and test splits (and eval for the AIE unless the FVs come
    from a file), the checkpoint to resume, the run folder and cache; checked."""
    from mfv.method.extraction import validate_extraction

    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    aie = cli.aie_settings
    adapter = module.adapter
    relations = check_relations_match(module, datamodule)
    validate_extraction(adapter, relations, datamodule, aie)
    ckpt_path = cli.config.get("ckpt_path")
    checkpoint = check_checkpoint(ckpt_path, module) if ckpt_path else None
    extracting = not module.fv_initialized
    vectors = module.function_vectors.numel() * 4
    outputs: dict[str, tuple[str | Path, int]] = {
        "run folder (trainer.logger / trainer.default_root_dir)":
            (Path(trainer.log_dir or trainer.default_root_dir), RUN_OUTPUT_BYTES + 8 * (vectors + 2**16))}
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            outputs["checkpoint.dirpath"] = (callback.dirpath, 4 * (vectors + 2**16))
    if extracting:
        outputs["aie.cache_dir"] = (aie.cache_dir, aie.cache_bytes(adapter, relations))
    written = check_outputs(outputs)
    uses = {"eval": aie.prompt_use(datamodule.shots)} if extracting else {}
    uses.update(train=SplitUse("fine-tuning"), val=SplitUse("validation: the best epoch"), test=SplitUse("test"))
    allow_changes = bool(cli.config.get("allow_changed_data"))
    settings = shaping_settings(cli.config.as_dict()) if checkpoint is not None else {}
    if checkpoint is not None:  # changed settings are refused before the data is read and hashed
        check_resume(checkpoint, ckpt_path, settings, {}, allow_changes)
    fingerprints = check_data(adapter, datamodule, relations, uses)
    plan = RunPlan(relations, uses, written, fingerprints)
    if checkpoint is not None:  # the same data and settings as the run it resumes, or explicitly allowed
        plan.resume_changes = check_resume(checkpoint, ckpt_path, settings, fingerprints, allow_changes)
    return plan


def plan_evaluation(cli, settings) -> RunPlan:
    """evaluate.py's plan: the splits the protocol reads
    (:func:`mfv.evaluation.requirements.requirements`), the ``--fv`` file, ``--out`` and the
    cache; checked."""
    from mfv.evaluation.requirements import requirements
    from mfv.method.extraction import validate_extraction

    module, datamodule, config = cli.model, cli.datamodule, cli.config
    aie = cli.aie_settings
    adapter = module.adapter
    relations = check_relations_match(module, datamodule)
    settings.validate()
    validate_extraction(adapter, relations, datamodule, aie)
    aie = settings.aie_settings(aie, datamodule)  # the counts the protocol extracts with (authors: every eval prompt)
    finetuned = check_vectors(config.fv, adapter, relations) if config.fv else None
    if settings.limit is not None and settings.limit < len(relations):
        raise ConfigError(f"--limit {settings.limit}: fewer prompts than the {len(relations)} relations "
                          f"(model.relations), so the mean over relations would leave some out; use --limit >= "
                          f"{len(relations)}")
    written = check_outputs({"--out": (config.out, EVALUATION_OUTPUT_BYTES),
                             "aie.cache_dir": (aie.cache_dir, aie.cache_bytes(adapter, relations))})
    uses = requirements(settings, datamodule, aie)  # the protocol says which splits it reads, and how
    fingerprints = check_data(adapter, datamodule, relations, uses)
    plan = RunPlan(relations, uses, written, fingerprints, finetuned)
    if finetuned is not None:
        recorded = dict(finetuned.metadata.get("data_fingerprints") or {})
        plan.fv_data_mismatch = {split: [recorded[split], fingerprints[split]] for split in recorded
                                 if split in fingerprints and recorded[split] != fingerprints[split]}
    return plan
