"""Reading and writing checkpoints safely.

* Every file is read with ``torch.load(..., weights_only=True)``: a file that would need arbitrary
  unpickling (and could run code) is refused, never executed.
* Writes are atomic (:func:`mdeq.utils.output_files.replace_file`): a temporary file in the same
  folder, flushed and fsync'ed, then renamed over the target, so a crash or a full disk at any moment
  leaves the previous checkpoint intact.
* Another implementation's names for a model's tensors (the original MDEQ release stores the
  equilibrium stage four times) are mapped by the model's own alias table: a model that has one sets
  ``state_dict_aliases`` (see :data:`StateDictAliases`, and ``MDEQNet.state_dict_aliases``), and
  :func:`load_weights` / :func:`load_pretrained` apply it; this module knows no model.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .distributed import unwrap
from .output_files import OutputWriteError, replace_file

logger = logging.getLogger(__name__)

#: a model's alias table: a key prefix of another implementation's state dict -> the model's own prefix
#: (a renamed tensor, dropped when the state dict also holds it under the model's name), or ``None``
#: (a copy that carries nothing new, dropped)
StateDictAliases = Mapping[str, Optional[str]]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointWriteError(OutputWriteError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the file it replaces is intact."""


#: how a zip archive starts: torch.save's format since torch 1.6
_ZIP_MAGIC = b"PK\x03\x04"
#: bytes read to tell a pickle from another file
_SNIFF_BYTES = 1 << 16


def _looks_like_pickle(head: bytes) -> bool:
    """Whether ``head`` (the start of a file) parses as pickle opcodes up to a STOP or to its end.

    torch's legacy format and the original's ``.pkl`` are pickle streams; text, yaml, JSON, images
    and numpy files are not, and fail on their first bytes. Parsing the opcodes runs nothing.
    """
    stream = io.BytesIO(head)
    try:
        for _ in pickletools.genops(stream):
            pass
        return True
    except ValueError:
        # running out of bytes is no evidence against a pickle longer than the head (or a truncated
        # one, which torch.load then reports as such); an unknown opcode before the end is
        return stream.tell() >= len(head)


def _not_a_checkpoint(path: str, what: str) -> CheckpointError:
    """The "not a checkpoint" error for ``path``, ``what`` saying why."""
    return CheckpointError(f"{path} is not a checkpoint ({what}): give a file written by torch.save, e.g. "
                           f"checkpoint.pth.tar / final_state.pth of a run, or the original's .pkl")


def _check_format(path: str) -> None:
    """Raise a "not a checkpoint" error for a folder, an empty file or a file of another format."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: give the checkpoint inside it "
                              f"(e.g. {os.path.join(path, 'checkpoint.pth.tar')})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise _not_a_checkpoint(path, "the file is empty, 0 bytes; was the write that made it interrupted?")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head.startswith(_ZIP_MAGIC) and not _looks_like_pickle(head):
        raise _not_a_checkpoint(path, f"it starts with {head[:12]!r}, neither a zip archive nor a pickle")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that say what is wrong with the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: a folder, an empty file or another kind of file ("not a checkpoint"), a
            file that needs arbitrary unpickling (refused, nothing in it runs), a truncated or
            corrupt checkpoint.
    """
    path = os.fspath(path)
    _check_format(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it needs arbitrary unpickling, which can run code; only tensors, "
            f"numbers, strings and containers of them are accepted ({_reason(e)})") from e
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({e})") from e
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        # a pickle stream that is not torch.save's layout (what torch reports as e.g. "KeyError: 101")
        raise _not_a_checkpoint(path, f"a pickle stream torch cannot read: {type(e).__name__} {e}") from e


def _reason(err: BaseException) -> str:
    """The line of torch's weights-only error that names the offending object, without its advice
    to retry with ``weights_only=False`` (which would run the file's code)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln]
    return (useful or lines or [type(err).__name__])[0]


#: test hook: seconds to sleep between writing the temporary file and renaming it (crash tests)
SAVE_DELAY_ENV = "MDEQ_TEST_SAVE_DELAY"


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    The temporary file is ``.tmp-<name>-XXXX`` in the same folder; it is removed if the write fails.
    A process killed at any moment leaves ``path`` either old or new, never partial.

    Raises:
        CheckpointWriteError: the write failed (disk full, quota, I/O error, read-only folder); the
            message names the folder and the reason and says that ``path`` was left as it was.
    """
    delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
    if delay > 0:
        logger.warning("%s=%s: sleeping before renaming the temporary file to %s", SAVE_DELAY_ENV, delay, path)
    replace_file(path, lambda f: torch.save(dict(state), f), CheckpointWriteError, pause_s=delay)


def extract_state_dict(obj: Any, source: str = "", aliases: StateDictAliases = {}) -> Dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint, with another implementation's keys mapped by
    ``aliases`` (:data:`StateDictAliases`; the model's ``state_dict_aliases``).

    Accepts a bare state dict (ours or the original's ``.pkl``), or our training checkpoints
    (a dict with a ``'model'`` or ``'state_dict'`` entry). Strips DDP's ``module.`` prefix.
    ``source`` (the file) prefixes the error.
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source or 'the file'} holds no state dict (expected a mapping of names to "
                              f"tensors, or a checkpoint with a 'model' or 'state_dict' entry; got "
                              f"{type(obj).__name__})")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    out = {}
    for k, v in sd.items():
        prefix = next((p for p in aliases if k.startswith(p)), None)
        if prefix is None:
            out[k] = v
        elif aliases[prefix] is not None and aliases[prefix] + k[len(prefix):] not in sd:
            out[aliases[prefix] + k[len(prefix):]] = v
    return out


def model_aliases(model: nn.Module) -> StateDictAliases:
    """The alias table ``model`` (or the model a DDP wrapper holds) declares (``{}`` without one)."""
    return getattr(unwrap(model), "state_dict_aliases", {})


def mismatch_report(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]
                    ) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, shapes): the keys of ``model_sd`` that ``sd`` lacks, the keys of ``sd``
    that ``model_sd`` lacks, and one ``"key: checkpoint (..) vs model (..)"`` line per shape mismatch."""
    missing = sorted(k for k in model_sd if k not in sd)
    unexpected = sorted(k for k in sd if k not in model_sd)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
                    for k in sd if k in model_sd and sd[k].shape != model_sd[k].shape)
    return missing, unexpected, shapes


def _listing(title: str, items: List[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more if items else ""


def mismatch_listing(missing: List[str], unexpected: List[str], shapes: List[str]) -> str:
    """The three lists of :func:`mismatch_report` as the indented lines of an error message."""
    return (_listing("missing in the checkpoint", missing) + _listing("unexpected in the checkpoint", unexpected)
            + _listing("shape mismatches", shapes))


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> Dict[str, List[str]]:
    """Load our checkpoint or an original MDEQ ``.pkl`` into ``model`` (the original's names mapped by
    the model's ``state_dict_aliases``).

    With ``strict`` any missing or unexpected key, or any shape mismatch, raises a
    :class:`CheckpointError` that lists them; otherwise the matching tensors are loaded and the
    lists are returned (``{'missing': [...], 'unexpected': [...], 'shape': [...]}``).
    """
    sd = extract_state_dict(load_checkpoint(path), os.fspath(path), model_aliases(model))
    target = unwrap(model)
    model_sd = target.state_dict()
    missing, unexpected, shapes = mismatch_report(model_sd, sd)
    if strict and (missing or unexpected or shapes):
        raise CheckpointError(f"{path} does not fit this model (another architecture or config?)"
                              + mismatch_listing(missing, unexpected, shapes))
    bad = {s.split(":")[0] for s in shapes}
    target.load_state_dict({k: v for k, v in sd.items() if k in model_sd and k not in bad}, strict=False)
    return {"missing": missing, "unexpected": unexpected, "shape": shapes}


def load_pretrained(model: nn.Module, path: str | os.PathLike,
                    required_prefixes: Iterable[str]) -> Dict[str, List[str]]:
    """Initialise ``model`` from a checkpoint of another task (e.g. ImageNet -> Cityscapes).

    Loads every tensor whose name and shape match, logs the modules that were not found on either
    side, and raises :class:`CheckpointError` if a weight under ``required_prefixes`` (the stem and
    f_theta: :data:`mdeq.models.BACKBONE_PREFIXES`) is missing or has another shape.
    """
    sd = extract_state_dict(load_checkpoint(path), os.fspath(path), model_aliases(model))
    target = unwrap(model)
    model_sd = target.state_dict()
    missing, unexpected, shapes = mismatch_report(model_sd, sd)
    prefixes = tuple(required_prefixes)
    bad_required = [k for k in missing if k.startswith(prefixes)] + [s for s in shapes if s.startswith(prefixes)]
    if bad_required:
        raise CheckpointError(f"{path}: the pretrained checkpoint lacks weights the model needs"
                              + _listing("missing or mismatched", bad_required))
    bad = {s.split(":")[0] for s in shapes}
    target.load_state_dict({k: v for k, v in sd.items() if k in model_sd and k not in bad}, strict=False)
    top = lambda keys: sorted({k.split(".")[0] for k in keys})  # noqa: E731
    logger.info("loaded %d tensors from %s", len(model_sd) - len(missing) - len(bad), path)
    if unexpected:
        logger.info("in the checkpoint but not in this model (dropped): %s", top(unexpected))
    if missing:
        logger.info("in this model but not in the checkpoint (kept at initialisation): %s", top(missing))
    return {"missing": missing, "unexpected": unexpected, "shape": shapes}
