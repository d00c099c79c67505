"""Find or fetch the Multi30k task-1 raw files, verified against embedded SHA-256 checksums.

:func:`resolve_data_root` decides where the corpus comes from:

1. ``root`` given: that folder is used as it is (it must exist; nothing is downloaded into it).
2. ``root`` None and the environment variable ``LIGHTNING_MOE_DATA`` set: that folder, used as it is.
3. Otherwise ``{cache_dir}/multi30k``: files already there are verified and kept, missing or corrupt ones are
   downloaded from :data:`BASE_URL` (only with ``download=True``). No other local copy is searched for.

Each file is fetched by ``torch.hub.download_url_to_file`` into ``<name>.part`` and moved into place with
``os.replace`` only after its size and SHA-256 matched, so a reader never sees a half-written file. A file
whose checksum does not match is removed and reported. A file lock (``.locks/`` beside the files, see
:func:`cache_lock`) makes processes that fetch the same file at once download it once; the others wait and
reuse it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.error import HTTPError, URLError

from filelock import FileLock
from torch.hub import download_url_to_file

__all__ = [
    "BASE_URL",
    "DATA_ENV",
    "CACHE_ENV",
    "MULTI30K_FILES",
    "SAMPLE_DIR",
    "ChecksumError",
    "cache_lock",
    "default_cache_dir",
    "download_file",
    "download_multi30k",
    "multi30k_files",
    "resolve_data_root",
    "sha256_file",
]

log = logging.getLogger(__name__)

BASE_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/"
"""Public location of the Multi30k task-1 raw files; a file's URL is ``BASE_URL + name``."""

DATA_ENV = "LIGHTNING_MOE_DATA"
"""Environment variable naming an existing corpus folder, used when no ``root`` is given."""

CACHE_ENV = "LIGHTNING_MOE_CACHE"
"""Environment variable overriding the default cache folder (downloads, tokenizers)."""

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
"""The Multi30k sample shipped in the package: the first 3000 ``train`` lines and the first 300 lines of ``val``
and ``test_2016_flickr``, in en/de/fr (see its README.md). Pass it as ``root`` to run offline."""

SUBDIR = "multi30k"
"""Folder under the cache directory that receives downloaded Multi30k files."""

MULTI30K_FILES: dict[str, tuple[str, int]] = {
    "test_2016_flickr.cs.gz": ("200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1", 22572),
    "test_2016_flickr.de.gz": ("9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8", 22890),
    "test_2016_flickr.en.gz": ("611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9", 21077),
    "test_2016_flickr.fr.gz": ("6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90", 22310),
    "test_2017_flickr.de.gz": ("a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee", 21471),
    "test_2017_flickr.en.gz": ("76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074", 19138),
    "test_2017_flickr.fr.gz": ("3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496", 20434),
    "train.cs.gz": ("a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077", 593827),
    "train.de.gz": ("726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6", 637044),
    "train.en.gz": ("d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f", 568929),
    "train.fr.gz": ("622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c", 604242),
    "val.cs.gz": ("b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc", 22096),
    "val.de.gz": ("f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a", 24681),
    "val.en.gz": ("14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28", 21650),
    "val.fr.gz": ("ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9", 23001),
}
"""``file name -> (SHA-256 hex digest, size in bytes)`` of the public Multi30k task-1 raw files."""

MULTI30K_LANGS = ("cs", "de", "en", "fr")
"""Languages of Multi30k task 1 (``test_2017_flickr`` has no ``cs``)."""

_CHUNK = 1 << 16


class ChecksumError(ValueError):
    """A downloaded file whose SHA-256 or size differs from the expected one (the file has been removed)."""


def default_cache_dir() -> Path:
    """``$LIGHTNING_MOE_CACHE``, else ``$XDG_CACHE_HOME/lightning_moe``, else ``~/.cache/lightning_moe``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_moe"


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def multi30k_files(langs: Iterable[str] | None = None, splits: Iterable[str] | None = None) -> list[str]:
    """Names in :data:`MULTI30K_FILES` for the given languages and splits (None = all), sorted."""
    langs = None if langs is None else set(langs)
    splits = None if splits is None else set(splits)
    if langs is not None and not langs <= set(MULTI30K_LANGS):
        raise ValueError(f"langs={sorted(langs)} has languages Multi30k lacks: use a subset of {list(MULTI30K_LANGS)}")
    known_splits = {name.split(".")[0] for name in MULTI30K_FILES}
    if splits is not None and not splits <= known_splits:
        raise ValueError(f"splits={sorted(splits)} has unknown splits: use a subset of {sorted(known_splits)}")
    chosen = []
    for name in MULTI30K_FILES:
        split, lang, _ = name.split(".")
        if (langs is None or lang in langs) and (splits is None or split in splits):
            chosen.append(name)
    return sorted(chosen)


def _verified(path: Path, sha256: str, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256


def cache_lock(target: str | os.PathLike) -> FileLock:
    """An inter-process lock for preparing the cached file ``target`` (the lock file is
    ``<folder>/.locks/<name>.lock``), so that processes preparing the same file do the work once."""
    target = Path(target)
    lock_dir = target.parent / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(lock_dir / f"{target.name}.lock")


def download_file(url: str, dest: str | os.PathLike, sha256: str, size: int, *, retries: int = 3) -> Path:
    """Fetch ``url`` to ``dest`` unless ``dest`` already holds the expected bytes; return ``dest``.

    Raises:
        ChecksumError: the downloaded bytes do not match; the downloaded file is removed.
        OSError: the network failed ``retries`` times in a row, or the server refused the file (HTTP 4xx).
    """
    if retries < 1:
        raise ValueError(f"retries={retries!r} is invalid: use an integer >= 1")
    dest = Path(dest)
    if _verified(dest, sha256, size):
        return dest
    with cache_lock(dest):  # another process may be fetching the same file: wait, then re-check
        if _verified(dest, sha256, size):
            return dest
        return _download_locked(url, dest, sha256, size, retries)


def _download_locked(url: str, dest: Path, sha256: str, size: int, retries: int) -> Path:
    if dest.exists():
        log.warning("%s does not match its checksum: downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: BaseException | None = None
    for attempt in range(1, retries + 1):
        try:
            # writes to a temporary name of its own and moves it to `part` only once the body is read
            download_url_to_file(url, os.fspath(part), progress=sys.stderr.isatty())
            break
        except (URLError, TimeoutError, ConnectionError) as err:
            if isinstance(err, HTTPError) and 400 <= err.code < 500 and err.code not in (408, 429):
                raise OSError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
            last_error = err
            log.warning("downloading %s failed (attempt %d of %d): %s", url, attempt, retries, err)
            if attempt < retries:
                time.sleep(min(2.0 ** (attempt - 1), 8.0))
    else:
        raise OSError(
            f"could not download {url} after {retries} attempts ({last_error}): check the network connection, "
            f"or pass root= (or ${DATA_ENV}) pointing to a local copy of the corpus"
        ) from last_error

    got_size = part.stat().st_size
    got_sha = sha256_file(part)
    if got_size != size or got_sha != sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{url} does not match its checksum (got sha256 {got_sha}, {got_size} bytes; expected {sha256}, "
            f"{size} bytes); the downloaded file was removed. Try again; if it persists the upstream file changed: "
            f"download it by hand and pass its folder as root"
        )
    os.replace(part, dest)
    return dest


def download_multi30k(
    dest: str | os.PathLike,
    langs: Iterable[str] | None = None,
    splits: Iterable[str] | None = None,
    *,
    base_url: str = BASE_URL,
    retries: int = 3,
) -> Path:
    """Make sure ``dest`` holds the verified Multi30k files of ``langs`` x ``splits`` (None = all); return it."""
    dest = Path(dest)
    for name in multi30k_files(langs, splits):
        sha256, size = MULTI30K_FILES[name]
        download_file(base_url + name, dest / name, sha256, size, retries=retries)
    return dest


def resolve_data_root(
    root: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    langs: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
) -> Path:
    """The folder to read the corpus from (see the module docstring for the order of the choices).

    Arguments:
        root: an existing corpus folder, used as it is; None = ``$LIGHTNING_MOE_DATA`` or the cache.
        cache_dir: the cache folder (None = :func:`default_cache_dir`); Multi30k goes to ``{cache_dir}/multi30k``.
        download: fetch missing or corrupt files into the cache; False raises if any is missing.
        langs, splits: the Multi30k files needed (None = all of them).

    Raises:
        ValueError: ``root`` (or ``$LIGHTNING_MOE_DATA``) is not a folder, or with ``download=False`` the
            cache lacks files (the message lists them).
    """
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"root={str(root)!r} is not a folder: pass an existing folder of {{split}}.{{lang}}[.gz] files, "
                f"or root=None to use ${DATA_ENV} or download Multi30k into the cache"
            )
        return path
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ValueError(f"${DATA_ENV}={env!r} is not a folder: point it to a corpus folder or unset it")
        return path
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / SUBDIR
    if download:
        return download_multi30k(target, langs, splits)
    missing = [name for name in multi30k_files(langs, splits) if not _verified(target / name, *MULTI30K_FILES[name])]
    if missing:
        raise ValueError(
            f"download=False but {target} lacks verified files {missing}: set download=True, or pass root= "
            f"(or ${DATA_ENV}) pointing to a local copy"
        )
    return target
