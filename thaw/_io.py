"""Writing files so that a crash, a kill or a full disk never leaves a damaged one behind."""

from __future__ import annotations

import glob
import os
import socket
import stat
import tempfile
import unicodedata
import zipfile
from pathlib import Path
from typing import Callable

from thaw.errors import ThawError, WriteError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over the old file."""
    kept = ""
    try:
        kept = "; the previous file is intact" if path.is_file() else ""  # said only where there was one
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_killed_writes(path)
        handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise WriteError(f"could not write {path}: {error.strerror or error}{kept}") from None
    os.close(handle)
    try:
        write(Path(temporary))
        # mkstemp makes it private (0600), and a writer may make a new file of its own (safetensors does): after
        # the write, a saved file gets the mode any other file would
        os.chmod(temporary, 0o666 & ~_umask())
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise WriteError(f"could not write {path}: {error.strerror or error}{kept}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove_killed_writes(path: Path) -> None:
    """The temporary copies of `path` that writers killed mid-write (kill -9, a power cut) on this machine left:
    a killed `thaw report` or export would leave one per kill, for good. A live writer's, or another machine's (a
    shared disk, where no process can be checked), stay."""
    prefix = f".{path.name}."
    try:
        leftovers = list(path.parent.glob(f"{glob.escape(prefix)}*.tmp"))
    except OSError:  # a folder that cannot be listed: the write says so if it cannot write either
        return
    for leftover in leftovers:
        try:
            if left_by_killed_writer(leftover.name[len(prefix):-len(".tmp")]):
                leftover.unlink(missing_ok=True)
        except OSError:  # another user's leftover in a shared folder (sticky /tmp): theirs to remove; the write goes on
            continue


def _temporary_prefix(path: Path) -> str:
    """`.NAME.` and writer_tag(), where the name leaves room for it: a name near the file system's limit (255 bytes)
    that wrote before gets the untagged prefix, whose leftovers no later write can tell from a live writer's."""
    tagged = f".{path.name}.{writer_tag()}"
    return tagged if len(os.fsencode(tagged)) + TEMPORARY_SUFFIX_BYTES <= NAME_MAX else f".{path.name}."


NAME_MAX = 255  # bytes in one file name on the usual Linux and macOS file systems
TEMPORARY_SUFFIX_BYTES = len("abcdefgh.tmp")  # tempfile's 8 random characters, then .tmp


def writer_tag() -> str:
    """This machine's name and this process's id, then "-": put in a temporary file's name, so that one a killed
    process left is known as such."""
    return f"{socket.gethostname()}-{os.getpid()}-"


def left_by_killed_writer(tagged: str) -> bool:
    """Whether `tagged` (writer_tag() then tempfile's random suffix, which holds no "-") names a process of this
    machine that is gone. Read from the right: a host name may hold "-" (node and node-2 share a prefix)."""
    host, pid, _ = ([""] * 3 + tagged.rsplit("-", 2))[-3:]
    # a pid is a few ASCII digits: anything else (a huge number, a Unicode digit) is no writer's tag
    return host == socket.gethostname() and pid.isascii() and pid.isdigit() and len(pid) <= 10 and process_gone(int(pid))


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


# What to do about a folder that cannot be written: for a new run, another; where a run is resumed, another --out is
# no choice
NEW_RUN_NOT_WRITABLE = "choose another (out, --out)"
RESUME_NOT_WRITABLE = "make it writable, or copy the run to a folder you can write and resume that copy"


def check_writable(folder: Path, remedy: str = NEW_RUN_NOT_WRITABLE) -> None:
    """Before any work: a folder thaw can create and write in (a run that cannot save is lost work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".thaw-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        # mkdir's "File exists" for a file there says nothing a user can act on
        why = "a file, not a folder, is there" if folder.exists() and not folder.is_dir() else (error.strerror or str(error))
        raise ThawError(f"output folder {folder} is not writable ({why}); {remedy}") from None


def answers(question: Callable[[], bool]) -> bool:
    """`path.is_file()` and the like, False where the name cannot be a path (too long for the file system, a NUL in
    it): such a name is reported as missing, or taken for what it is (a text), never a traceback."""
    try:
        return question()
    except (OSError, ValueError):
        return False


def process_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this machine: one killed (kill -9, a power cut) left what it held behind.
    Another user's process is there (signalling it is refused); a pid reused since counts as there."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # there, but another user's
        pass
    return False


def special_kind(mode: int) -> str:
    """What a path that is neither a regular file nor a folder is, as a user would call it."""
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device"}
    return next((name for is_kind, name in kinds.items() if is_kind(mode)), "a special file")


def special_file(path: Path) -> str | None:
    """`special_kind` of a path that exists and is neither a regular file nor a folder (a pipe from `<(...)`,
    /dev/null); None for any other path."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else special_kind(mode)


def zip_entry_names(path: Path) -> tuple[str, ...]:
    """The names inside a zip file (torch.save's and torch.jit.save's files are zips), read from its index alone;
    () for a file that is no zip or cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return tuple(archive.namelist())
    except Exception:  # noqa: BLE001 - zipfile raises NotImplementedError, EOFError and others for a damaged index
        return ()


def names_a_folder(text: str) -> bool:
    """Whether a path typed for a file ends as a folder does (plots/, out/.): Path() drops the ending, so the file would
    be written where the folder was meant."""
    separators = ("/", os.sep) + ((os.altsep,) if os.altsep else ())
    return text.endswith(separators) or any(text.endswith(sep + ".") for sep in separators) or text in (".", "..")


def lies_within(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or lies in it, links resolved; False where either cannot be resolved (a name the file
    system refuses, a symlink loop): the write that follows says why."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def missing_folders(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first: what making `path` creates."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_made_folders(made: list[Path]) -> None:
    """Remove the folders a command made (missing_folders' list, deepest first) where nothing else is in them."""
    for folder in made:
        try:
            folder.rmdir()
        except FileNotFoundError:  # never made: the command stopped before
            continue
        except OSError:  # something else is in it now: not ours to remove
            break


def on_one_line(name: str) -> str:
    """A file name as a line of output shows it: control characters and Unicode's line separators (a line break or tab,
    which a Linux file name may hold) written as Python escapes, so one file stays one line and its columns stay where
    a reader expects them. Every other character is kept, a no-break space or an emoji's joiner as well."""
    return "".join(repr(character)[1:-1] if unicodedata.category(character) in ("Cc", "Zl", "Zp") else character for character in name)
