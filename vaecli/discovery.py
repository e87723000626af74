"""A run's inputs and outputs: the layout check, the folder walk, and one claim per output path.

Rules (docs/cli.md, "Inputs, outputs and overlap"):
- No input lies inside the output folder and the output folder is no input folder; the output folder may
  lie inside an input folder, and is then left out of the walk. Folders are compared by identity (device
  and inode), so symlinks, bind mounts and other spellings of one folder count as that folder.
- Only regular files are read. Symlinks to files are followed (with a note); symlinked folders met while
  walking are not (a note names each), which keeps walks finite; a folder named on the command line is
  followed. A file reached twice (two spellings, hard links) is one item.
- Every output path (diff maps and other side files included) is claimed by one item; a second item
  that would write it fails with a message, as does an output name longer than the file system allows,
  or an output path that is a folder, a FIFO or the same file as an input.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError
from .files import file_kind, forget_temp, is_temp_name, name_max, probe_writable, temp_path

Siblings = Callable[[Path], Sequence[Path]]  # an item's main output -> the other files it writes


@dataclass
class Item:
    """One input file and where its outputs go."""

    input: Path
    rel: str  # path relative to the folder it was found in (or its name), posix: names outputs, seeds noise
    output: Path | None
    error: str | None = None  # known before reading: missing path, output collision, not a regular file
    outputs: tuple[Path, ...] = ()  # every file this item writes: output first, then its siblings
    notes: list[str] = field(default_factory=list)


Identity = tuple[int, int]  # (st_dev, st_ino)


def _identity(path: Path | str) -> Identity | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class OutputNames:
    """How a command names its outputs: the suffix it writes, and the suffixes that make `-o` name one file."""

    suffix: str  # e.g. ".safetensors", ".png"
    lookalikes: tuple[str, ...] = ()  # suffixes of this kind of output (the command's other formats included)


class FolderPath(type(Path())):  # type: ignore[misc]  # the concrete class: PosixPath or WindowsPath
    """An output path written with a trailing separator (`-o x.safetensors/`): a folder, whatever its suffix."""


def output_path(text: str) -> Path:
    """`-o` as typed: a trailing / (or the OS separator) says folder, which Path() would forget."""
    return FolderPath(text) if text.endswith(("/", os.sep)) and text.strip("/" + os.sep) else Path(text)


def output_is_file(inputs: Sequence[str | Path], out: Path | None, names: OutputNames | None) -> bool:
    """Whether `-o out` names the one output file instead of a folder: it ends in an output suffix of the
    command and is neither an existing folder nor written with a trailing separator (FolderPath). It then
    takes exactly one input, a file, and the suffix written."""
    if out is None or names is None or isinstance(out, FolderPath) or out.suffix.lower() not in names.lookalikes:
        return False
    if out.is_dir():
        return False
    if len(inputs) != 1 or Path(inputs[0]).expanduser().is_dir():
        what = "the input is a folder" if len(inputs) == 1 else f"{len(inputs)} inputs are given"
        raise ConfigError(
            f"-o {out} names one output file (it ends in {out.suffix}), which takes one input file, but {what}; "
            "for several inputs or a folder give an output folder (a name without that suffix)"
        )
    if not _same_suffix(out.suffix, names.suffix):
        raise ConfigError(f"-o {out} ends in {out.suffix}, but this command writes {names.suffix} files here; "
                          f"name the output file <name>{names.suffix}, or choose the --format that writes {out.suffix}")
    return True


def _same_suffix(a: str, b: str) -> bool:
    alias = {".jpeg": ".jpg"}
    return alias.get(a.lower(), a.lower()) == alias.get(b.lower(), b.lower())


def check_layout(inputs: Sequence[str | Path], out: Path | None, names: OutputNames | None = None) -> None:
    """Refuse, before any work, a layout in which an output could replace an input or be read as one.

    With `names`, an `-o` naming one output file is checked too (output_is_file); that file may not be
    the input (checked with the items, by identity)."""
    if out is None or output_is_file(inputs, out, names):
        return
    out_id = _identity(out)
    if out_id is None or not out.is_dir():
        return  # a folder that does not exist yet holds no input
    folder_id = lru_cache(maxsize=None)(_identity)
    for raw in inputs:
        path = Path(raw).expanduser()
        if not os.path.lexists(path):
            continue
        if path.is_dir() and folder_id(str(path)) == out_id:
            raise ConfigError(
                f"the output folder {out} is the input folder {path}: outputs would replace inputs or be read "
                "as inputs; choose an output folder outside the inputs"
            )
        # Both the folders the name lies in and those its target lies in (a symlink may point into OUT).
        spellings = {Path(os.path.abspath(path)), path.resolve()}
        for folder in {p for s in spellings for p in s.parents}:
            if folder_id(str(folder)) == out_id:
                raise ConfigError(
                    f"input {path} lies inside the output folder {out}: outputs would replace inputs or be read "
                    "as inputs; choose an output folder outside the inputs"
                )


def check_inputs_exist(inputs: Sequence[str | Path]) -> None:
    """Refuse, before any work, input paths that do not exist: a typo in a path is a usage error (exit 2),
    not a failed item in a run that then does all the other work."""
    missing = [str(raw) for raw in inputs if not os.path.lexists(Path(raw).expanduser())]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ConfigError(f"no such file or folder: {shown}")


NO_INPUTS = "no inputs found (expected files with a supported suffix, or folders holding them)"


def require_inputs(inputs: Sequence[str | Path], suffixes: Sequence[str], out: Path | None) -> None:
    """Refuse, before the model loads or anything is written, inputs that hold no item at all: a file named
    directly is one, a folder must hold a file with one of `suffixes` (outside `out`, as discover walks).
    Stops at the first one found, so a large tree costs one directory listing or a few."""
    out_id = _identity(out) if out is not None else None
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.is_dir():
            return
        try:
            next(_walk(path, suffixes, out_id, None))
            return
        except StopIteration:
            continue
    raise ConfigError(NO_INPUTS)


def discover(
    inputs: Sequence[str | Path],
    suffixes: Sequence[str],
    out: Path | None,
    out_suffix: str | OutputNames,
    siblings: Siblings | None = None,
    notes: list[str] | None = None,
    flat: bool = False,
) -> list[Item]:
    """Expand files and folders (recursively, by suffix, hidden names skipped) into items with outputs.

    `D/a/b.jpg` found in folder D -> `out/a/b<out_suffix>`; a file named directly -> `out/<stem><out_suffix>`.
    Refuses an overlapping layout (check_layout); files under `out` are never inputs. `siblings` names the
    other files an item writes beside its output; run-level notes (folders not followed) go to `notes`.
    A path that does not exist raises ConfigError (check_inputs_exist). With OutputNames, an `out` that names
    one output file (output_is_file) is the output of the single input. flat: every output at the top of
    `out`, named by the input's file name (ComfyUI lists only those); two inputs of one name are a claim
    conflict for the second.
    """
    names = out_suffix if isinstance(out_suffix, OutputNames) else OutputNames(out_suffix)
    check_inputs_exist(inputs)
    check_layout(inputs, out, names)
    single = output_is_file(inputs, out, names)
    out_id = _identity(out) if out is not None and not single else None
    claims = _Claims(out.parent if single else out) if out is not None else None
    items: list[Item] = []
    seen: set[Identity] = set()

    def add(path: Path, rel: str) -> None:
        ident = _identity(path)
        if ident is not None:
            if ident in seen:
                return  # named twice, or a hard link: one item
            seen.add(ident)
        named = rel.rsplit("/", 1)[-1] if flat else rel
        stem = named.rsplit(".", 1)[0] if "." in named.rsplit("/", 1)[-1] else named
        target = (out if single else out / (stem + names.suffix)) if out is not None else None
        outputs = (target, *(siblings(target) if siblings else ())) if target is not None else ()
        item = Item(path, rel, target, outputs=outputs)
        item.error = _input_problem(path, out_id) or (claims.claim(item) if claims is not None else None)
        if item.error is None and path.is_symlink():
            item.notes.append(f"read through a symlink to {path.resolve()}")
        items.append(item)

    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            for found in _walk(path, suffixes, out_id, notes):
                if isinstance(found, Unreadable):
                    folder, reason = found
                    items.append(Item(folder, folder.relative_to(path).as_posix(), None, error=reason))
                    continue
                add(found, found.relative_to(path).as_posix())
        else:
            add(path, path.name)
    _refuse_outputs_that_are_inputs(items)
    return items


def _input_problem(path: Path, out_id: Identity | None) -> str | None:
    """Why `path` cannot be read as an input (without opening it), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symlink" if path.is_symlink() else "no such file"
    except OSError as exc:
        return f"cannot read this file: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"is {file_kind(st.st_mode)}, not a regular file; only regular files are read"
    if out_id is not None and path.is_symlink():
        if any(_identity(p) == out_id for p in path.resolve().parents):
            return "is a symlink into the output folder: an output is never read as an input"
    return None


def _refuse_outputs_that_are_inputs(items: list[Item]) -> None:
    """An existing output path that is an input file (a hard or symbolic link to it) fails its item."""
    by_identity = {ident: it for it in items if (ident := _identity(it.input)) is not None}
    for item in items:
        for target in item.outputs:
            ident = _identity(target) if os.path.lexists(target) else None
            source = by_identity.get(ident) if ident is not None else None
            if source is not None and item.error is None:
                item.error = f"its output {target} is the input file {source.input}; choose another output folder"


class Unreadable(tuple):  # type: ignore[type-arg]
    """(folder, reason): a folder met while walking that cannot be read (a path past PATH_MAX, no
    permission): one failed item, the rest of the walk goes on."""


def _folder_problem(exc: OSError) -> str:
    import errno

    if exc.errno == errno.ENAMETOOLONG:
        return ("cannot read this folder: its path is longer than the system allows (PATH_MAX); move it or "
                "shorten its names")
    if exc.errno == errno.EACCES:
        return "cannot read this folder: permission denied"
    return f"cannot read this folder: {exc.strerror or exc}"


def _walk(
    root: Path, suffixes: Sequence[str], exclude: Identity | None, notes: list[str] | None
) -> Iterator[Path | Unreadable]:
    errors: list[OSError] = []  # folders os.walk could not list
    for dirpath, dirnames, names in os.walk(root, onerror=errors.append):
        while errors:
            exc = errors.pop(0)
            yield Unreadable((Path(exc.filename or dirpath), _folder_problem(exc)))
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue  # hidden folders: .git, .cache, our .vaecli
            try:
                link = (here / d).is_symlink()
                inside_out = exclude is not None and _identity(here / d) == exclude
            except OSError as exc:  # e.g. ENAMETOOLONG: the folder, not the run, fails
                yield Unreadable((here / d, _folder_problem(exc)))
                continue
            if link:
                if notes is not None:
                    notes.append(f"not followed: {here / d} is a symlink to a folder (name it to include it)")
                continue
            if inside_out:
                continue  # the output folder inside an input folder
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(names):
            if name.startswith(".") or is_temp_name(name):
                continue  # hidden files: .DS_Store, macOS '._x.jpg' resource forks, our temp files
            if Path(name).suffix.lower() in suffixes:
                yield here / name
    for exc in errors:
        yield Unreadable((Path(exc.filename or root), _folder_problem(exc)))


class _Claims:
    """Output paths claimed so far, compared as the output file system compares names."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.limit = name_max(out)
        self.fold, self.fold_unicode = name_folding(out)
        self.owner: dict[str, Item] = {}  # output files
        self.folders: dict[str, Item] = {}  # folders below `out` that outputs need, by the first item needing each
        self.in_the_way: dict[Path, str | None] = {}  # such a folder's path -> what is there instead, if anything

    def _key(self, path: Path) -> str:
        """A path as the output file system tells names apart: NFC when it ignores Unicode normalization
        (café.png in NFC and NFD is one file there), case-folded when it ignores case."""
        text = str(path)
        if self.fold_unicode:
            text = unicodedata.normalize("NFC", text)
        return text.casefold() if self.fold else text

    def claim(self, item: Item) -> str | None:
        """Claim every output of `item` and the folders they need; the reason it cannot have them, or None.

        A path is claimed as a file or as a folder, never both (`a.png` -> out/a.safetensors beside
        `a.safetensors/x.png` -> out/a.safetensors/x.safetensors): the second item fails before any work."""
        keys, folders = [], []
        for target in item.outputs:
            for part in target.relative_to(self.out).parts:
                if len(os.fsencode(part)) > self.limit:
                    return f"its output name {part!r} is longer than the file system allows ({self.limit} bytes)"
            key = self._key(target)
            if key in self.owner:
                return f"its output {target} is also an output of {self.owner[key].input}; rename one of them"
            if key in self.folders:
                return (f"its output {target} is the folder that outputs of {self.folders[key].input} go into; "
                        "rename one of them")
            for folder in _folders_between(self.out, target):
                fkey = self._key(folder)
                if fkey in self.owner:
                    return (f"its output {target} needs a folder {folder}, which is the output file of "
                            f"{self.owner[fkey].input}; rename one of them")
                problem = self._in_the_way(folder)
                if problem is not None:
                    return f"its output {target} needs a folder {folder}, but {problem}; move it away"
                folders.append(fkey)
            if os.path.lexists(target):
                mode = os.lstat(target).st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                    return f"its output {target} is {file_kind(mode)}; move it away or choose another output folder"
            keys.append(key)
        for key in keys:
            self.owner[key] = item
        for fkey in folders:
            self.folders.setdefault(fkey, item)
        return None

    def _in_the_way(self, folder: Path) -> str | None:
        """What an existing non-folder at `folder` is (None: a folder, or nothing yet), looked up once."""
        if folder not in self.in_the_way:
            try:
                mode = os.lstat(folder).st_mode
            except OSError:
                found = None
            else:
                if stat.S_ISDIR(mode):
                    found = None
                elif stat.S_ISLNK(mode):  # never written through: it may lead anywhere, into the inputs too
                    found = (f"{folder} is a symlink (outputs are never written through a symlinked folder inside "
                             "the output folder)")
                else:
                    found = f"{folder} is {'a file' if stat.S_ISREG(mode) else file_kind(mode)}"
            self.in_the_way[folder] = found
        return self.in_the_way[folder]


def _folders_between(out: Path, target: Path) -> list[Path]:
    """The folders below `out` that `target` lies in (out/a/b/x.png: out/a, out/a/b)."""
    parents = []
    for parent in target.parents:
        if parent == out or len(parent.parts) <= len(out.parts):
            break
        parents.append(parent)
    return parents[::-1]


def name_folding(out: Path) -> tuple[bool, bool]:
    """(ignores case, ignores Unicode normalization): how the file system that will hold `out` compares
    names. Probed in `out` when it exists (a mount point has its own file system, not its parent's), else
    in its nearest existing parent, where `out` will be created: a hidden temp file is made there, its name
    looked up with the case swapped and in NFD, and removed. A folder that cannot be written falls back to
    looking up an existing name with its case swapped (case only)."""
    folder = next((p for p in (out, *out.parents) if p.is_dir()), None)
    return _probe_folding(folder) if folder is not None else (False, False)


_PROBE_NAME = "vaecli-probe-Caf\u00e9"  # letters for case, an NFC character for normalization


@lru_cache(maxsize=64)
def _probe_folding(folder: Path) -> tuple[bool, bool]:
    probe = temp_path(folder / _PROBE_NAME)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.close(fd)
    except OSError:
        forget_temp(probe)
        return _case_insensitive(folder), False
    try:
        name = probe.name
        case = os.path.lexists(probe.with_name(name.swapcase()))
        nfd = unicodedata.normalize("NFD", name)
        unicode = nfd != name and os.path.lexists(probe.with_name(nfd))
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
        forget_temp(probe)
    return case, unicode


def _case_insensitive(folder: Path) -> bool:
    """Whether names on folder's file system ignore case: the nearest existing path with letters in its
    name, spelled with the case swapped, names the same file."""
    for p in (folder, *folder.parents):
        if p.name and p.name != p.name.swapcase() and p.exists():
            swapped = p.with_name(p.name.swapcase())
            try:
                return swapped.exists() and os.path.samefile(p, swapped)
            except OSError:
                return False
    return False


def check_output_root(items: list[Item], out: Path | None) -> None:
    """Create the output folder and try a file in it: when that fails, every item fails up front, before
    the model runs on any."""
    if out is None:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"cannot create the output folder {out}: {exc.strerror or exc} (a file in the way, or no permission?)"
    else:
        try:
            probe_writable(out)
            return
        except OSError as exc:
            message = (f"cannot write in the output folder {out}: {exc.strerror or exc} "
                       "(read-only, full, or no permission?)")
    for item in items:
        item.error = item.error or message

