"""One path layer for local folders and storage URLs (gs://, s3://, ...).

Every file the project reads or writes goes through `path(...)`, an
`etils.epath.Path`. An emulator (or another endpoint) is chosen with the
standard STORAGE_EMULATOR_HOST alone: importing this module sets what each
storage library needs from it (`emulator_settings`).
"""
import logging
import os
import re
from typing import Mapping

from etils import epath

from omnismola import errors

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(errors.InputError):
  """A storage location that cannot be used; the message names it."""


def is_url(location: str | os.PathLike) -> bool:
  """Whether `location` names remote storage (scheme://...)."""
  return bool(_URL.match(os.fspath(location)))


def path(location: str | os.PathLike) -> epath.Path:
  """`location` as an epath.Path: URLs unchanged (`os.path.abspath` would
  make gs://b/run a local folder), local paths expanded (~) and absolute.
  A URL scheme epath has no backend for is a StorageError."""
  location = os.fspath(location)
  if not is_url(location):
    return epath.Path(os.path.abspath(os.path.expanduser(location)))
  try:
    return epath.Path(location)
  except KeyError:  # epath's registry of URL schemes.
    raise StorageError(f"{location}: etils.epath has no backend for "
                       f"{location.split('://')[0]}:// URLs.") from None


def check_bucket(location: str | os.PathLike) -> None:
  """Raises StorageError unless the bucket of URL `location` exists (local
  paths pass): once, up front, naming the URL, rather than deep inside a
  checkpoint save or after every retry of every request."""
  location = os.fspath(location)
  if not is_url(location):
    return
  scheme, rest = location.split("://", 1)
  bucket = path(f"{scheme}://{rest.split('/', 1)[0]}")
  # gcsfs logs a traceback for a request out of retries; the StorageError
  # below says the same in one line.
  gcsfs_log = logging.getLogger("gcsfs")
  was_disabled, gcsfs_log.disabled = gcsfs_log.disabled, True
  try:
    found = bucket.exists()
  # Each backend (gcsfs, TensorFlow, s3fs) raises its own network errors.
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise StorageError(f"{location}: cannot reach {bucket} "
                       f"({type(e).__name__}: {e})") from e
  finally:
    gcsfs_log.disabled = was_disabled
  if not found:
    raise StorageError(f"{location}: the bucket {bucket} does not exist (or "
                       "these credentials cannot see it).")


def append_text(file: epath.Path, text: str) -> None:
  """Appends `text` to `file`, creating it. An object in a bucket cannot be
  appended to (gcsfs's "a" mode silently replaces it): it is uploaded
  again whole, replacing the old one at once."""
  if not is_url(file):
    with file.open("a") as f:
      f.write(text)
    return
  old = file.read_text() if file.exists() else ""
  file.write_text(old + text)


def tensorflow_location(location: str | os.PathLike) -> str:
  """`location` for TensorFlow's own file system (tf.data, TFDS, SeqIO),
  refused for gs:// under STORAGE_EMULATOR_HOST: TensorFlow's GCS client
  takes no endpoint, so it would reach the real service."""
  located = path(location)
  if os.fspath(located).startswith("gs://") and os.environ.get(
      "STORAGE_EMULATOR_HOST"):
    raise StorageError(
        f"{location}: TensorFlow cannot read gs:// through the emulator at "
        f"STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']} (its "
        "GCS client has no endpoint setting); use a local folder here.")
  return os.fspath(located)


def emulator_settings(environ: Mapping[str, str]) -> dict[str, str]:
  """The variables the storage libraries need for STORAGE_EMULATOR_HOST,
  besides gcsfs, which reads it itself (docs/training.md, "Emulators and
  other endpoints", says why each). Variables already set are left out:
  they win."""
  host = environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return {}
  derived = {
      "TENSORSTORE_GCS_HTTP_URL": host if "://" in host else "http://" + host,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "EPATH_USE_TF": "false",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  return {k: v for k, v in derived.items() if k not in environ}


os.environ.update(emulator_settings(os.environ))
