"""Checks that an output path can be written, made before any work whose result it would hold."""

from __future__ import annotations

import os
import tempfile


def _probe(folder: str) -> str | None:
    """Why a file cannot be created in ``folder`` (``None`` if one can): the check creates
    and removes a file, which also catches read-only file systems and access rules that
    ``os.access`` does not see."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mtljax-write-test-", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(name)
    return None


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_file(path: str | os.PathLike, what: str) -> str:
    """Raises ``ValueError`` naming ``what`` (e.g. ``"--out"``), the path and the problem
    unless a file can be written at ``path``; returns the absolute path. Creates nothing."""
    shown = os.fspath(path)
    full = os.path.abspath(shown)
    if os.path.isdir(full):
        raise ValueError(f"{what} {shown}: is a folder; give a file name")
    parent = os.path.dirname(full)
    if not os.path.exists(parent):
        raise ValueError(f"{what} {shown}: the folder {parent} does not exist")
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {shown}: {parent} is not a folder")
    if os.path.exists(full):
        try:
            with open(full, "ab"):
                pass
        except OSError as e:
            raise ValueError(f"{what} {shown}: cannot write this file ({e.strerror})") from e
        return full
    problem = _probe(parent)
    if problem is not None:
        raise ValueError(f"{what} {shown}: cannot create a file in {parent} ({problem})")
    return full


def check_output_dir(path: str | os.PathLike, what: str) -> str:
    """Raises ``ValueError`` naming ``what``, the path and the problem unless ``path`` is a
    writable folder or one that can be created; returns the absolute path. Creates nothing."""
    shown = os.fspath(path)
    full = os.path.abspath(shown)
    existing = _nearest_existing(full)
    if not os.path.isdir(existing):
        if existing == full:
            raise ValueError(f"{what} {shown}: is a file, not a folder")
        raise ValueError(f"{what} {shown}: cannot create it, {existing} is a file")
    problem = _probe(existing)
    if problem is not None:
        if existing == full:
            raise ValueError(f"{what} {shown}: cannot write in this folder ({problem})")
        raise ValueError(f"{what} {shown}: cannot create it in {existing} ({problem})")
    return full


__all__ = ["check_output_dir", "check_output_file"]
