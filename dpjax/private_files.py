"""Owner-only files and folders: what holds the run's secrets or private data.

`<workdir>/checkpoints/` holds both secret keys (noise and sampling, see
`train/secrets.py`); `private_*` files are derived from private data. On a
shared machine a file another user can read is a published file, so these
are created owner-only WHATEVER THE UMASK: folders 0700, files 0600. The
mode is set explicitly (`os.open(..., 0o600)` then `fchmod`, `chmod` after
`makedirs`), never left to the umask, which can only remove bits.

A folder that is 0700 makes everything below it unreachable to other users
whatever the modes of what is inside; `restrict_tree` also sets each entry
below such a folder (e.g. after Orbax, which writes with the umask's modes).

Bucket paths (`gs://...`) have no POSIX modes: these functions write them
as usual and their protection is the bucket's access control (PRIVACY.md).
Entries owned by another user (e.g. another run's checkpoints read for a
warm start) are left as they are.
"""

import os
import stat
from typing import TextIO

from etils import epath

DIR_MODE = 0o700
FILE_MODE = 0o600


def is_local(path: str | os.PathLike) -> bool:
  """True for a POSIX path, False for a bucket URL (gs://...)."""
  return "://" not in os.fspath(path)


def _owned(st: os.stat_result) -> bool:
  return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def _restrict(path: str, mode: int) -> None:
  """chmod `path` to `mode` if this user owns it and it has other bits."""
  try:
    st = os.lstat(path)
  except FileNotFoundError:  # Removed meanwhile (e.g. an old checkpoint).
    return
  if stat.S_ISLNK(st.st_mode) or not _owned(st):
    return
  if stat.S_IMODE(st.st_mode) != mode:
    try:
      os.chmod(path, mode)
    except FileNotFoundError:
      pass


def make_private_dir(path: str) -> str:
  """Creates `path` (and its parents, with default modes) and makes `path`
  itself 0700; an existing folder of this user is restricted too (a run
  started before this rule). Bucket paths: created, nothing else."""
  if not is_local(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
    return path
  os.makedirs(path, mode=DIR_MODE, exist_ok=True)
  _restrict(path, DIR_MODE)
  return path


def restrict_tree(path: str) -> None:
  """Makes `path` and every folder below it 0700 and every file 0600 (only
  entries this user owns; symbolic links are not followed). Safe while
  another thread writes below `path`: an entry that vanishes is skipped,
  and one created after the walk is still behind the 0700 `path`."""
  if not is_local(path) or not os.path.isdir(path):
    return
  _restrict(path, DIR_MODE)
  for root, dirs, files in os.walk(path):
    for d in dirs:
      _restrict(os.path.join(root, d), DIR_MODE)
    for f in files:
      _restrict(os.path.join(root, f), FILE_MODE)


def open_private(path: str) -> TextIO:
  """`open(path, "w")` of a local file, but owner-only (0600) whatever the
  umask, also when the file existed with wider modes (restricted before
  anything is written)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
  try:
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "w", encoding="utf-8")
  except BaseException:
    os.close(fd)
    raise


def write_private_text(path: str, text: str) -> None:
  """Writes `text` to `path` owner-only (`open_private`). Bucket paths: an
  ordinary write (the bucket's access control protects it)."""
  if not is_local(path):
    epath.Path(path).write_text(text)
    return
  with open_private(path) as f:
    f.write(text)
