"""``kdrepro prepare``: put a dataset on disk in the layout its loader reads, or check the one already there.

* synthetic: generate (deterministic from ``generate.seed``) unless the manifest says the same data is already there,
  then write the Cityscapes train-id labels like for the real data;
* cityscapes: if the root is missing, download ``gtFine_trainvaltest.zip`` and ``leftImg8bit_trainvaltest.zip`` with
  cityscapesscripts' downloader (``csDownload``; optional dependency ``pip install kdrepro[cityscapes]``; credentials
  from ``CITYSCAPES_USERNAME``/``CITYSCAPES_PASSWORD``), extract; check the layout; write ``*_labelTrainIds.png``;
* ade20k: if the root is missing, download ``ADEChallengeData2016.zip``, verify its pinned MD5, extract; check.

Every label file prepare does not rewrite is checked (decodes, single channel, values in the dataset's set, the
size of its image; checked once and again only when its size or time stamp changes): damaged train-id labels are
written again from their label ids, damaged synthetic label ids make the set be generated again, and damaged
originals (Cityscapes label ids, ADE20K annotations) are named with the command that restores them.

Downloads go through an injectable ``download`` callable so tests (and air-gapped users with their own mirror)
never need the network. Extraction is atomic: an interrupted or failed prepare leaves no half-written root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdrepro.data import ade20k, cityscapes, synthetic
from kdrepro.data.io import atomic_directory, size_problem
from kdrepro.data.io import label_problem as content_problem
from kdrepro.data.labels import CITYSCAPES_VALID_IDS, valid_train_ids
from kdrepro.errors import PREPARE_COMMAND, ConfigError, DatasetError
from kdrepro.io import write_json_atomic

CITYSCAPES_PACKAGES = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")

Download = Callable[[Any, Path], None]
"""``download(what, destination)``: for Cityscapes ``what`` is a package name and ``destination`` a folder to put
``<package name>`` in; for ADE20K ``what`` is a URL and ``destination`` the file to write."""


def prepare_dataset(dataset_cfg: Any, download: Download | None = None) -> Path:
    """Make the dataset of ``dataset_cfg`` ready for :func:`kdrepro.data.build_dataset`; return its root.

    Raises:
        DatasetError: a download, checksum, archive or layout problem (the message says what to do).
        ConfigError: the config names an unknown layout.
    """
    root = Path(str(dataset_cfg.root))
    name = str(dataset_cfg.name)
    num_classes = int(dataset_cfg.get("num_classes", 19))
    if dataset_cfg.get("generate") is not None:
        return _prepare_synthetic(root, name, dict(dataset_cfg.generate), num_classes)
    layout = str(dataset_cfg.layout)
    if layout == "cityscapes":
        packages = list(dataset_cfg.get("download", {}).get("packages", CITYSCAPES_PACKAGES))
        return _prepare_cityscapes(root, name, packages, download or download_cityscapes_package, num_classes)
    if layout == "ade20k":
        source = dataset_cfg.get("download", {})
        url, md5 = str(source.get("url", ade20k.URL)), str(source.get("md5", ade20k.MD5))
        return _prepare_ade20k(root, name, url, md5, download or download_url)
    raise ConfigError(f"dataset.layout={layout!r} is not one of cityscapes, ade20k")


def _prepare_synthetic(root: Path, name: str, params: dict, num_classes: int) -> Path:
    try:
        params = synthetic.normalize_params(params)
    except ValueError as error:
        raise ConfigError(f"dataset.generate: {error}; fix it in the profile or the override") from None
    if not synthetic.is_generated(root, params):
        if root.exists() and not (root / synthetic.MANIFEST).is_file() and any(root.iterdir()):
            raise DatasetError(
                f"{root} exists but was not written by the synthetic generator (no {synthetic.MANIFEST}); "
                f"move it away or set dataset.root to another folder"
            )
        synthetic.generate(root, **params)
    if _cityscapes_labels(root, name, num_classes):  # damaged generated label ids: generate the set again
        synthetic.generate(root, **params)
        _cityscapes_labels(root, name, num_classes)
    return root


def _prepare_cityscapes(root: Path, name: str, packages: Sequence[str], download: Download, num_classes: int) -> Path:
    if not root.exists():
        staging = root.parent / f".{root.name}.download"
        staging.mkdir(parents=True, exist_ok=True)
        for package in packages:
            done = staging / f"{package}.complete"
            if not done.is_file():
                (staging / package).unlink(missing_ok=True)
                download(package, staging)
                if not (staging / package).is_file():
                    raise DatasetError(f"the download of {package} did not produce {staging / package}")
                done.touch()
        extract_zips([staging / package for package in packages], root, strip_single_folder=False)
        shutil.rmtree(staging, ignore_errors=True)
    cityscapes.check_root(root, name)
    damaged = _cityscapes_labels(root, name, num_classes)
    if damaged:
        raise DatasetError(
            f"{_count(damaged, 'labelIds file')} damaged: {_first(damaged)}; restore them from gtFine_trainvaltest.zip "
            f"(unzip -o gtFine_trainvaltest.zip <file> -d {root}), or move {root} away and run "
            f"`{_command(name)}` to download it again"
        )
    return root


def _prepare_ade20k(root: Path, name: str, url: str, md5: str, download: Download) -> Path:
    if not root.exists():
        archive = root.parent / Path(url).name
        if not (archive.is_file() and md5sum(archive) == md5):
            partial = archive.with_name(archive.name + ".part")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.unlink(missing_ok=True)
            try:
                download(url, partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            actual = md5sum(partial) if partial.is_file() else "nothing (no file was written)"
            if actual != md5:
                partial.unlink(missing_ok=True)
                raise DatasetError(
                    f"{url} downloaded with MD5 {actual}, expected {md5}: the file is corrupt or changed; "
                    f"retry, or download it by hand to {archive}"
                )
            os.replace(partial, archive)
        extract_zips([archive], root, strip_single_folder=True)
        archive.unlink()
    ade20k.check_root(root, name)
    damaged = _ade20k_labels(root)
    if damaged:
        raise DatasetError(
            f"{_count(damaged, 'ADE20K annotation')} damaged: {_first(damaged)}; restore them from "
            f"ADEChallengeData2016.zip (unzip -o ADEChallengeData2016.zip 'ADEChallengeData2016/annotations/*'), or "
            f"move {root} away and run `{_command(name)}` to download it again"
        )
    return root


# -- label validation -------------------------------------------------------------------------------------------------
#: ``<root>/`` + this: ``{relative path: [size, mtime_ns]}`` of the label files prepare has checked or written; a file
#: whose size or modification time changed since is checked again.
CHECKED = ".kdrepro_checked_labels.json"


def label_problem(path: Path, valid_values: np.ndarray, image: Path, dataset_name: str = "dataset's") -> str | None:
    """What is wrong with a label file and its image, as training would find it (the checks of
    :mod:`kdrepro.data.io`, shared with the loader): undecodable, not single-channel, values outside
    ``valid_values``, an image that is missing or cannot be opened, a size other than its image's; or ``None``."""
    try:
        with Image.open(path) as label:
            label.load()
            mode, size, values = label.mode, label.size, np.array(label)
    except (OSError, SyntaxError, ValueError) as error:
        return f"cannot be decoded ({error})"
    problem = content_problem(mode, values, valid_values, dataset_name)
    if problem is not None:
        return problem
    try:
        with Image.open(image) as picture:
            picture.load()  # decoded as the loader will (checked once, then again only when the file changes)
            image_size = picture.size
    except FileNotFoundError:
        return f"has no image {image}"
    except (OSError, SyntaxError, ValueError) as error:
        return f"has an image {image} that cannot be decoded ({error})"
    return size_problem(size, image_size, image)


def _signature(path: Path) -> list[int]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return [-1, -1]
    return [stat.st_size, stat.st_mtime_ns]


class _Checked:
    """The record of label files already checked (see :data:`CHECKED`)."""

    def __init__(self, root: Path):
        self.root, self.path = root, root / CHECKED
        try:
            self.entries: dict[str, list[int]] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.entries = {}

    def problem(self, label: Path, valid_values: np.ndarray, image: Path, dataset_name: str) -> str | None:
        key = label.relative_to(self.root).as_posix()
        signature = [*_signature(label), *_signature(image)]  # a replaced image is checked again too
        if self.entries.get(key) == signature:
            return None
        problem = label_problem(label, valid_values, image, dataset_name)
        if problem is None:
            self.entries[key] = signature
        return problem

    def written(self, label: Path, image: Path) -> None:
        self.entries[label.relative_to(self.root).as_posix()] = [*_signature(label), *_signature(image)]

    def save(self) -> None:
        write_json_atomic(self.path, self.entries)


def _cityscapes_labels(root: Path, name: str, num_classes: int) -> list[str]:
    """Check every labelIds file and every existing labelTrainIds file; (re)write the train ids that are missing or
    damaged. Returns the damaged labelIds files (``"<path> <problem>"``), which prepare cannot rebuild."""
    checked, damaged = _Checked(root), []
    train_ids = valid_train_ids(num_classes)
    for source in cityscapes.label_id_files(root, name):
        image = cityscapes.image_of(root, source)
        problem = checked.problem(source, CITYSCAPES_VALID_IDS, image, name)
        if problem is not None:
            damaged.append(f"{source} {problem}")
            continue
        target = cityscapes.train_id_path(source)
        if not target.is_file() or checked.problem(target, train_ids, image, name) is not None:
            cityscapes.write_train_id_label(source, target, name)
            checked.written(target, image)
    checked.save()
    return damaged


def _ade20k_labels(root: Path) -> list[str]:
    """The damaged annotations of an ADE20K root (``"<path> <problem>"``); the originals cannot be rebuilt."""
    checked, damaged = _Checked(root), []
    for split in ade20k.SPLIT_FOLDERS.values():
        for label in sorted((root / "annotations" / split).glob("*.png")):
            image = root / "images" / split / f"{label.stem}.jpg"
            problem = checked.problem(label, ade20k.RAW_VALID_VALUES, image, "ade20k")
            if problem is not None:
                damaged.append(f"{label} {problem}")
    checked.save()
    return damaged


def _command(name: str) -> str:
    return PREPARE_COMMAND.get() or f"kdrepro prepare dataset={name}"


def _count(items: list[str], what: str) -> str:
    return f"{len(items)} {what}{'s are' if len(items) > 1 else ' is'}"


def _first(items: list[str], shown: int = 3) -> str:
    return "; ".join(items[:shown]) + (f"; ... ({len(items)} in all)" if len(items) > shown else "")


def md5sum(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def extract_zips(archives: Sequence[Path], root: Path, strip_single_folder: bool) -> None:
    """Extract ``archives`` into a temporary folder and rename it to ``root`` only when all succeeded.

    With ``strip_single_folder``, an archive whose entries all sit in one top folder (``ADEChallengeData2016/``)
    becomes ``root`` itself rather than ``root/<top folder>``.
    """
    with atomic_directory(root) as folder:
        for archive in archives:
            try:
                with zipfile.ZipFile(archive) as handle:
                    handle.extractall(folder)
            except (zipfile.BadZipFile, OSError) as error:
                raise DatasetError(f"cannot extract {archive} ({error}); delete it and run prepare again") from error
        entries = list(folder.iterdir())
        if strip_single_folder and len(entries) == 1 and entries[0].is_dir():
            inner = entries[0]
            for item in list(inner.iterdir()):
                os.replace(item, folder / item.name)
            inner.rmdir()


def download_url(url: str, destination: Path) -> None:
    """Stream ``url`` to ``destination`` (the default ADE20K downloader)."""
    print(f"downloading {url} to {destination}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as handle:
            shutil.copyfileobj(response, handle, length=1 << 20)
    except OSError as error:
        raise DatasetError(f"cannot download {url} ({error}); check the network or download it by hand") from error


def download_cityscapes_package(package: str, destination: Path) -> None:
    """Download one Cityscapes package with cityscapesscripts' downloader (the code behind ``csDownload``).

    Credentials come from ``CITYSCAPES_USERNAME``/``CITYSCAPES_PASSWORD`` when set; otherwise cityscapesscripts
    uses its stored credentials file or asks interactively.
    """
    try:
        from cityscapesscripts.download import downloader
    except ImportError as error:
        raise DatasetError(
            "downloading Cityscapes needs cityscapesscripts: `pip install kdrepro[cityscapes]` "
            "(or download gtFine/leftImg8bit yourself and set dataset.root)"
        ) from error
    username, password = os.environ.get("CITYSCAPES_USERNAME"), os.environ.get("CITYSCAPES_PASSWORD")
    try:
        session = _login(username, password) if username and password else downloader.login()
        downloader.download_packages(session=session, package_names=[package], destination_path=str(destination))
    except DatasetError:
        raise
    except Exception as error:  # cityscapesscripts raises bare Exception for bad credentials and failed checksums
        raise DatasetError(
            f"cannot download Cityscapes package {package} ({error}); check CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD "
            f"(an account from https://www.cityscapes-dataset.com/register/)"
        ) from error


def _login(username: str, password: str):
    """A logged-in ``requests`` session, posting the same form as ``cityscapesscripts.download.downloader.login``."""
    import requests

    session = requests.Session()
    session.get("https://www.cityscapes-dataset.com/login", allow_redirects=False).raise_for_status()
    reply = session.post(
        "https://www.cityscapes-dataset.com/login",
        data={"username": username, "password": password, "submit": "Login"},
        allow_redirects=False,
    )
    reply.raise_for_status()
    if reply.status_code != 302:
        raise DatasetError("Cityscapes rejected CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD: check them")
    return session
