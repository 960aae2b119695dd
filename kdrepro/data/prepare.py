"""``kdrepro prepare``: put a dataset on disk in the layout its loader reads, or check the one already there.

* synthetic: generate (deterministic from ``generate.seed``) unless the manifest says the same data is already there,
  then write the Cityscapes train-id labels like for the real data;
* cityscapes: if the root is missing, download ``gtFine_trainvaltest.zip`` and ``leftImg8bit_trainvaltest.zip`` with
  cityscapesscripts' downloader (``csDownload``; optional dependency ``pip install kdrepro[cityscapes]``; credentials
  from ``CITYSCAPES_USERNAME``/``CITYSCAPES_PASSWORD``), extract; check the layout; write ``*_labelTrainIds.png``;
* ade20k: if the root is missing, download ``ADEChallengeData2016.zip``, verify its pinned MD5, extract; check.

Downloads go through an injectable ``download`` callable so tests (and air-gapped users with their own mirror)
never need the network. Extraction is atomic: an interrupted or failed prepare leaves no half-written root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdrepro.data import ade20k, cityscapes, synthetic
from kdrepro.data.io import atomic_directory
from kdrepro.errors import ConfigError, DatasetError

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
    if dataset_cfg.get("generate") is not None:
        return _prepare_synthetic(root, name, dict(dataset_cfg.generate))
    layout = str(dataset_cfg.layout)
    if layout == "cityscapes":
        packages = list(dataset_cfg.get("download", {}).get("packages", CITYSCAPES_PACKAGES))
        return _prepare_cityscapes(root, name, packages, download or download_cityscapes_package)
    if layout == "ade20k":
        source = dataset_cfg.get("download", {})
        url, md5 = str(source.get("url", ade20k.URL)), str(source.get("md5", ade20k.MD5))
        return _prepare_ade20k(root, name, url, md5, download or download_url)
    raise ConfigError(f"dataset.layout={layout!r} is not one of cityscapes, ade20k")


def _prepare_synthetic(root: Path, name: str, params: dict) -> Path:
    params = {key: int(value) for key, value in params.items()}
    if not synthetic.is_generated(root, params):
        if root.exists() and not (root / synthetic.MANIFEST).is_file() and any(root.iterdir()):
            raise DatasetError(
                f"{root} exists but was not written by the synthetic generator (no {synthetic.MANIFEST}); "
                f"move it away or set dataset.root to another folder"
            )
        synthetic.generate(root, **params)
    cityscapes.write_train_id_labels(root, name)
    return root


def _prepare_cityscapes(root: Path, name: str, packages: Sequence[str], download: Download) -> Path:
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
    cityscapes.write_train_id_labels(root, name)
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
    return root


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
