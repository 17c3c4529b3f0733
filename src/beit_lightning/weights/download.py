"""Download a URL once into the cache, as torch.hub's ``download_url_to_file`` does it: into a
temporary file beside the target, hashing while writing, renamed only when complete and correct, so
a killed or broken download never looks finished and a file of the wrong hash is never kept.

The cache is ``$BEIT_LIGHTNING_CACHE`` (default ``~/.cache/beit_lightning``); a URL's file lives at
``<cache>/<host>/<path of the URL>``, so that the place to put a file fetched elsewhere is plain.
``BEIT_LIGHTNING_OFFLINE=1`` forbids any download (the cache only).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["HashMismatchError", "WeightsUnavailableError", "cache_dir", "download_url", "url_cache_path"]

CHUNK = 1 << 20


class WeightsUnavailableError(FileNotFoundError):
    """The weights are not in the cache and cannot be downloaded; the message says what to place where."""


class HashMismatchError(ValueError):
    """The downloaded file's sha256 is not the expected one; the file was not kept."""


def cache_dir() -> str:
    """``$BEIT_LIGHTNING_CACHE``, else ``~/.cache/beit_lightning``."""
    return os.path.expanduser(os.environ.get("BEIT_LIGHTNING_CACHE") or os.path.join("~", ".cache", "beit_lightning"))


def offline() -> bool:
    return os.environ.get("BEIT_LIGHTNING_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def url_cache_path(url: str, root: str | os.PathLike | None = None) -> str:
    """Where the file of ``url`` lives in the cache: ``<root>/<host>/<path>``."""
    parts = urllib.parse.urlsplit(url)
    pieces = [p for p in urllib.parse.unquote(parts.path).split("/") if p not in ("", ".", "..")]
    if not parts.netloc or not pieces:
        raise ValueError(f"not a file URL: {url!r}")
    return os.path.join(os.fspath(root) if root is not None else cache_dir(), parts.netloc.replace(":", "_"), *pieces)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_url(
    url: str,
    sha256: str | None = None,
    dest: str | os.PathLike | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    name: str | None = None,
) -> str:
    """The local path of ``url``'s file: from the cache (``dest``, default :func:`url_cache_path`),
    or downloaded there first.

    A cached file is trusted as it is (it was checked when it was written). A download goes to
    ``<dest>.partial-<pid>``, is checked against the ``Content-Length`` and ``sha256`` (when known),
    and only then renamed to ``dest``. ``name`` (a registry name) goes into the messages. Raises :class:`HashMismatchError` naming both hashes (nothing
    is kept) and :class:`WeightsUnavailableError` naming the URL and ``dest`` when there is no network.
    """
    dest = os.fspath(dest) if dest is not None else url_cache_path(url)
    if os.path.isfile(dest):
        return dest
    place = (f"download {url} where you have network (e.g. `beit-lightning-weights download {name or url}` on a "
             f"login node, or any tool) and place it at {dest} (the cache is $BEIT_LIGHTNING_CACHE, now {cache_dir()})")
    if offline():
        raise WeightsUnavailableError(f"{url} is not in the cache and BEIT_LIGHTNING_OFFLINE is set: {place}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.partial-{os.getpid()}"
    digest, written = hashlib.sha256(), 0
    try:
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "beit-lightning"}),
                                              timeout=timeout)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise WeightsUnavailableError(f"cannot download {url} ({reason}): {place}") from None
        with response:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc=os.path.basename(dest), disable=not progress) as bar:
                try:
                    for chunk in iter(lambda: response.read(CHUNK), b""):
                        f.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                except (OSError, urllib.error.URLError) as err:
                    raise WeightsUnavailableError(f"the download of {url} broke off after {written} bytes ({err}): "
                                                  f"{place}") from None
        if total is not None and written != total:
            raise WeightsUnavailableError(f"the download of {url} ended after {written} of {total} bytes: {place}")
        got = digest.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise HashMismatchError(f"{url} has sha256 {got} but {sha256.lower()} was expected: the file was not kept. "
                                    "The server may serve another version, or the download was altered")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def check_sha256(path: str, sha256: str | None) -> None:
    """Raise :class:`HashMismatchError` when ``path`` does not have ``sha256`` (``None``: not checked)."""
    if sha256 is not None and (got := _sha256(path)) != sha256.lower():
        raise HashMismatchError(f"{path} has sha256 {got} but {sha256.lower()} was expected")
