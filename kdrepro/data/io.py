"""Reading images and label maps, and the one Dataset class every layout uses.

Every failure a user can cause (missing root, missing or corrupt file, image without label, wrong size, a label
value outside the dataset's set) raises :class:`~kdrepro.errors.DatasetError` with a message that names the file and
the fix, instead of a PIL or NumPy traceback in the middle of training.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdrepro.errors import PREPARE_COMMAND, DatasetError


def prepare_hint(dataset_name: str) -> str:
    """The command that (re)builds the dataset, quoted in error messages: the one built from the running command's
    own profile, params file and dataset overrides (:data:`kdrepro.errors.PREPARE_COMMAND`), else the dataset's."""
    return f"run `{PREPARE_COMMAND.get() or f'kdrepro prepare dataset={dataset_name}'}`"


def require_root(root: Path, dataset_name: str, subfolders: Sequence[str]) -> Path:
    """Check that ``root`` exists and holds ``subfolders``; raise DatasetError naming the path and the fix."""
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist: {prepare_hint(dataset_name)} (or set dataset.root)")
    missing = [name for name in subfolders if not (root / name).is_dir()]
    if missing:
        raise DatasetError(
            f"dataset root {root} lacks {', '.join(missing)}: it is not a complete {dataset_name} folder; "
            f"{prepare_hint(dataset_name)} or point dataset.root at the right folder"
        )
    return root


def _open(path: Path, what: str, dataset_name: str) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"{what} {path} is missing: {prepare_hint(dataset_name)}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"{what} {path} cannot be decoded ({error}); delete it and {prepare_hint(dataset_name)}"
        ) from error


def read_image(path: Path, dataset_name: str) -> np.ndarray:
    """An RGB image as a ``(H, W, 3)`` uint8 array."""
    return np.array(_open(path, "image", dataset_name).convert("RGB"))


def read_label(path: Path, valid_values: np.ndarray, dataset_name: str) -> np.ndarray:
    """A single-channel label map as a ``(H, W)`` uint8 array whose values all lie in ``valid_values``.

    Args:
        valid_values: boolean mask over 0..255 of the values the file may contain (e.g. Cityscapes label ids
            0..33 and 255, train ids 0..18 and 255, ADE20K 0..150).
    """
    image = _open(path, "label", dataset_name)
    label = np.array(image)
    problem = label_problem(image.mode, label, valid_values, dataset_name)
    if problem is not None:
        raise DatasetError(f"label {path} {problem}; {prepare_hint(dataset_name)}")
    return label


def label_problem(mode: str, label: np.ndarray, valid_values: np.ndarray, dataset_name: str) -> str | None:
    """What is wrong with a decoded label map (not single-channel, values outside ``valid_values``), or ``None``.

    The one check of a label's content, shared by training (:func:`read_label`) and ``kdrepro prepare``
    (:func:`kdrepro.data.prepare.label_problem`), so prepare never calls ready what training refuses."""
    if mode not in ("L", "P"):
        return f"has mode {mode}, expected a single-channel 8-bit PNG of class ids (not a colour rendering)"
    bad = ~valid_values[label]
    if bad.any():
        values = sorted({int(v) for v in np.unique(label[bad])})[:8]
        return f"contains values {values} outside the {dataset_name} set ({_describe(valid_values)})"
    return None


def size_problem(label_size: tuple[int, int], image_size: tuple[int, int], image_path: Path) -> str | None:
    """``None`` if a label's (width, height) equals its image's, else what differs (shared with prepare)."""
    if tuple(label_size) == tuple(image_size):
        return None
    return (f"is {label_size[0]}x{label_size[1]} but image {image_path} is {image_size[0]}x{image_size[1]} "
            "(width x height); they must match")


def _describe(valid_values: np.ndarray) -> str:
    values = np.flatnonzero(valid_values)
    runs, start = [], values[0]
    for previous, current in zip(values[:-1], values[1:], strict=True):
        if current != previous + 1:
            runs.append((start, previous))
            start = current
    runs.append((start, values[-1]))
    return ", ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in runs)


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path, dataset_name: str):
    problem = size_problem((label.shape[1], label.shape[0]), (image.shape[1], image.shape[0]), image_path)
    if problem is not None:
        raise DatasetError(f"label {label_path} {problem}: {prepare_hint(dataset_name)}")


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, path)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    An interrupted prepare leaves only a hidden ``.<name>.tmp-*`` folder (removed on the next attempt), never a
    half-written dataset at ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the dataset root's mode
    try:
        yield temporary
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-old-", dir=final.parent))
            os.replace(final, retired / final.name)
            os.replace(temporary, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


class SegmentationDataset(Dataset):
    """Image/label pairs on disk -> ``(image float32 (3, H, W), label int64 (H, W))``.

    Training mode (``joint_transform``) applies one joint pipeline (:func:`kdrepro.data.transforms.train_transform`) to
    the image and its mask together, drawing its randomness from a ``torch.Generator`` (:meth:`sample`).
    Evaluation mode (``image_transform``) follows mmsegmentation's test protocol: only the image is resized (to
    ``test_scale``) and normalised; the label keeps its original size and the evaluator upsamples the logits to it.
    Different images may then have different sizes, so evaluation loaders use batch size 1.

    Attributes:
        files: image paths, in the order of the items (for qualitative figures).
        label_files: the matching label paths.
    """

    def __init__(
        self,
        name: str,
        files: Sequence[Path],
        label_files: Sequence[Path],
        valid_label_values: np.ndarray,
        label_map: Callable[[np.ndarray], np.ndarray] | None = None,
        joint_transform: Callable | None = None,
        image_transform: Callable | None = None,
    ):
        if (joint_transform is None) == (image_transform is None):
            raise ValueError("give exactly one of joint_transform (training) and image_transform (evaluation)")
        self.name = name
        self.files = list(files)
        self.label_files = list(label_files)
        self.valid_label_values = valid_label_values
        self.label_map = label_map
        self.joint_transform = joint_transform
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``(H, W, 3)`` uint8 image and ``(H, W)`` uint8 label in train ids (``label_map`` applied once)."""
        image_path, label_path = self.files[index], self.label_files[index]
        image = read_image(image_path, self.name)
        label = read_label(label_path, self.valid_label_values, self.name)
        check_same_size(image, label, image_path, label_path, self.name)
        if self.label_map is not None:
            label = self.label_map(label)
        return image, label

    def sample(self, index: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``; training augmentation draws only from ``generator`` (unused in evaluation mode)."""
        image_array, label_array = self.load(index)
        image = torch.from_numpy(image_array).permute(2, 0, 1).contiguous()
        label = torch.from_numpy(label_array)
        if self.joint_transform is not None:
            return self.joint_transform(image, label, generator)
        return self.image_transform(image), label.long()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``; training augmentation is seeded from torch's global RNG (one draw per item)."""
        if self.joint_transform is None:
            return self.sample(index, None)
        return self.sample(index, torch.Generator().manual_seed(int(torch.randint(2**62, ()))))
