"""Every file kdrepro writes or reads back: atomic writes and safe checkpoint reading.

* **Atomic writes** (:func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`write_json_atomic`,
  :func:`save_checkpoint`): the bytes go to ``<name>.tmp`` in the same folder, are flushed to disk, then renamed over
  ``<name>``; a reader never sees half a file and a failed or interrupted write removes its ``.tmp``. A full disk,
  a permission problem, a path under a regular file or a read-only file system is a one-line
  :class:`~kdrepro.errors.StorageError` that says where, and for a full disk how many bytes were needed.
* **Safe reading** (:func:`read_torch_file`, :func:`load_checkpoint`): ``.pt``/``.pth`` files are unpickled by a
  restricted unpickler that builds tensors, storages, plain containers and NumPy arrays/scalars only. Objects of
  OpenMMLab classes (mmengine's ``HistoryBuffer`` in a runner checkpoint's ``message_hub``, ...) become inert
  :class:`Opaque` placeholders, and so do their attributes (``statistics_methods = {'min': HistoryBuffer.min}``
  pickles as ``getattr(HistoryBuffer, 'min')``: an attribute of a placeholder class only); any other global
  (``os.system``, ``builtins.eval``, ``getattr`` of anything else, ...) refuses the file, with the line that
  re-saves its weights alone. Nothing in a file is ever executed, whether kdrepro wrote it or not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdrepro.errors import StorageError, WeightsError

#: Module roots whose classes are read as inert :class:`Opaque` placeholders (training-state bookkeeping of
#: OpenMMLab runners; never weights).
OPAQUE_ROOTS = ("mmengine", "mmcv", "mmseg", "mmdet", "mmpretrain", "mmcls")
CHUNK_BYTES = 1 << 22
#: The version of the kdrepro checkpoint format (the ``format`` entry of every checkpoint kdrepro writes).
FORMAT_VERSION = 1


# -- writing ------------------------------------------------------------------------------------------------------------
def _megabytes(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def storage_error(error: OSError, path: Path, needed: int | None = None) -> OSError | StorageError:
    """The one-line :class:`StorageError` for a full disk, denied permission, a non-folder parent or a read-only
    file system while writing ``path``; any other ``OSError`` is returned unchanged."""
    path = Path(path)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = next((p for p in (path.parent, *path.parents) if p.is_dir()), Path("/"))
        free = shutil.disk_usage(folder).free
        need = f"needs {_megabytes(needed)}, " if needed is not None else ""
        return StorageError(
            f"no space left on the disk holding {folder} while writing {path.name} ({need}{_megabytes(free)} free); "
            "free some space there or write to another disk, then rerun"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"permission denied writing {path}; make {_first_existing(path)} writable or write elsewhere")
    if error.errno == errno.ENOTDIR:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path.parent)
        return StorageError(f"cannot write {path}: {blocker} is a file, not a folder; choose another location")
    if error.errno == errno.EROFS:
        return StorageError(f"cannot write {path}: {_first_existing(path)} is on a read-only file system; write elsewhere")
    return error


def _first_existing(path: Path) -> Path:
    return next((p for p in (path.parent, *path.parents) if p.exists()), path.parent)


@contextlib.contextmanager
def storage_errors(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn the ``OSError`` s of :func:`storage_error` raised inside the block into :class:`StorageError`."""
    try:
        yield
    except OSError as error:
        converted = storage_error(error, path, needed)
        if converted is error:
            raise
        raise converted from error


def ensure_dir(path: Path) -> Path:
    """``mkdir -p`` with one-line errors."""
    with storage_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _write_chunk(handle: Any, chunk: bytes | memoryview) -> None:
    handle.write(chunk)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``<path>.tmp`` + fsync + ``os.replace``; the ``.tmp`` never outlives a
    failure (an exception, a signal turned into one, a full disk)."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    view = memoryview(data)
    try:
        with storage_errors(path, len(data)):
            with open(tmp, "wb") as handle:
                for start in range(0, len(view), CHUNK_BYTES):
                    _write_chunk(handle, view[start : start + CHUNK_BYTES])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` ``state`` atomically: serialised in memory first, so the size needed is known and a full disk
    is a clear error rather than a stream failure deep inside torch."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def checkpoint_dict(
    weights: dict[str, Any], num_classes: int, model_cfg: dict[str, Any], finished: bool, **extra: Any
) -> dict[str, Any]:
    """What every kdrepro checkpoint holds, built in this one place: the format version, the model's ``weights``,
    what rebuilds the model (``num_classes``, ``model_cfg``: see :func:`kdrepro.models.loading.load_model`), whether
    it is ``finished``, and ``extra`` entries of its writer (optimiser and method state, RNGs, step, clock, ...)."""
    return {"format": FORMAT_VERSION, "model": weights, **extra, "num_classes": int(num_classes), "model_cfg": model_cfg,
            "finished": bool(finished)}  # fmt: skip


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# -- safe reading -------------------------------------------------------------------------------------------------------
class Opaque:
    """An object of a class kdrepro does not import: its constructor arguments and pickled state are kept as data;
    no code of the original class runs."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        instance = super().__new__(cls)
        instance.args, instance.state = args, None
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {type(self).__module__}.{type(self).__qualname__}>"


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """``numpy.core.multiarray.scalar`` without running NumPy's pickle hook: a scalar from its dtype and raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a NumPy scalar of an object dtype; refusing")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_reconstruct(subtype: type, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"a NumPy array of class {subtype!r}; refusing")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{module}.scalar"] = _numpy_scalar
        allowed[f"{module}._reconstruct"] = _numpy_reconstruct
    allowed["numpy.ndarray"] = np.ndarray
    allowed["numpy.dtype"] = np.dtype
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            allowed[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return allowed


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    return {**_weights_only_unpickler._get_allowed_globals(), **_numpy_globals()}


def _placeholder(module: str, qualname: str) -> type:
    """An inert :class:`Opaque` subclass standing for ``module.qualname``."""
    return types.new_class(qualname.rpartition(".")[2], (Opaque,),
                           exec_body=lambda ns: ns.update({"__module__": module, "__qualname__": qualname}))


def _placeholder_attribute(owner: Any, name: Any) -> type:
    """``getattr`` as a pickle of protocol < 4 spells a nested name (``HistoryBuffer.min``), for placeholder classes
    only: the attribute is another placeholder; nothing of the real class is looked up."""
    if not (isinstance(owner, type) and issubclass(owner, Opaque)) or not isinstance(name, str):
        raise pickle.UnpicklingError(f"it would call builtins.getattr on {owner!r}, which kdrepro never unpickles")
    return _placeholder(owner.__module__, f"{owner.__qualname__}.{name}")


GETATTR = "builtins.getattr"


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals tensors, containers and NumPy data need; OpenMMLab classes (and their attributes)
    become placeholders."""

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        allowed = _ALLOWED.get(key)
        if allowed is not None:
            return allowed
        key = key.replace("__builtin__.", "builtins.", 1) if module == "__builtin__" else key  # protocol-2 spelling
        if key == GETATTR:
            return _placeholder_attribute
        if module.split(".")[0] in OPAQUE_ROOTS:
            return _placeholder(module, name)
        raise pickle.UnpicklingError(f"it would call {key}, which kdrepro never unpickles")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


_ALLOWED: dict[str, Any] = {}
RESTRICTED_PICKLE = types.ModuleType("kdrepro_restricted_pickle")
RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch >= 1.6) or a pickle stream (older torch, ``_use_new_zipfile_serialization=False``)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        head = handle.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Unpickle a PyTorch file without executing anything in it (see the module docstring).

    Raises:
        WeightsError: missing, not a PyTorch file, truncated, or asking for code to run (names the global).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; check the path")
    if not _ALLOWED:
        _ALLOWED.update(_allowed_globals())
    if not _looks_like_torch_file(path):
        raise WeightsError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except pickle.UnpicklingError as error:
        if "kdrepro never unpickles" in str(error):
            raise WeightsError(f"{path} is refused: {error}; if you trust its source, {resave_hint(path)}") from error
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({_short(error)}); re-create it") from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({_short(error)}); re-create it") from error


def resave_hint(path: Path) -> str:
    """The one command that re-saves a trusted checkpoint's weights alone (a plain tensor dict kdrepro reads)."""
    return ("re-save its weights alone and use that file: python -c \"import torch; c = torch.load('" + str(path)
            + "', weights_only=False); torch.save(c.get('state_dict', c), 'weights.pth')\"")


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A kdrepro checkpoint (``kdrepro train`` / ``kdrepro import-teacher``), read safely."""
    state = read_torch_file(path, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise WeightsError(f"{path} is not a kdrepro checkpoint (no 'model' entry); use `kdrepro import-teacher` for mmseg files")
    return state
