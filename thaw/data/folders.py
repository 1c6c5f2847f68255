"""Finding labelled images: split folders, one folder split by seed, or a CSV (or TSV) manifest.

Split folders are train/ with val/ (or valid/, validation/) and optionally test/, their names in any case
(Train/, VAL/). Two folders for one split (val/ and valid/) is an error: which one to score on is the user's call.
Without a val folder (train/ and test/, as Oxford Pets and many Kaggle sets come,
or train/ alone) a seeded stratified share of train/ is held out as val, and
test/ stays the test split.

Everything that would make a run meaningless (no images, one class, classes
that differ between splits, missing files) is an error before any work starts.
Files that are not decodable images are skipped and listed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable, Hashable, Sequence

from thaw._io import answers, on_one_line, special_file
from thaw._numbers import DECIMAL
from thaw.data.images import IMAGE_SUFFIXES, UnreadableImage, probe
from thaw.errors import ThawError

# Each folder name beside train/ (compared lower-cased) and the split it holds.
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
Sample = tuple[Path, int]


@dataclass(frozen=True)
class LabelledData:
    """Classes and their train/val(/test) samples: (image path or text, class index)."""

    classes: tuple[str, ...]
    train: tuple
    val: tuple
    test: tuple | None
    layout: str
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (where, reason)
    # True when the data came as train/ (+ val/, test/) folders: evaluation then scores one split, not the whole.
    split_folders: bool = False
    val_from_folder: bool = False  # val/ was given; else val is a seeded share held out of the training samples
    cautions: tuple[str, ...] = field(default=())  # what the reader found suspicious in the data, said as a run starts

    no_test_hint = "hold one out with --test-split"

    def split(self, name: str) -> tuple:
        samples = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if samples is None:
            splits = "train, val, test" if self.test else f"train, val ({self.no_test_hint})"
            raise ThawError(f"this dataset has no {name!r} split; splits: {splits}")
        return samples

    def everything(self) -> tuple:
        """Every readable sample, whatever split it was put in."""
        return self.train + self.val + (self.test or ())

    @property
    def notes(self) -> tuple[str, ...]:
        """What the user may not have meant, said as a run starts: class names that differ only in case (`dog`, `Dog`;
        a merge of two folders, a typo in a manifest) are two classes. Not an error: `a` and `A` may be two letters.
        Then the reader's own cautions (a text table's unclosed quote, texts in both train and val)."""
        return case_clashes(self.classes) + number_clashes(self.classes) + self.cautions


def number_clashes(classes: tuple[str, ...]) -> tuple[str, ...]:
    """Class names that are the same number written two ways (`1` and `1.0`: a label column a spreadsheet rewrote in
    part) are two classes; said, not refused, as for names that differ only in case (`1.1` and `1.10` may be two
    sections). Exact decimals of ASCII digits: no float rounding makes two large numbers one."""
    by_value: dict[Decimal, list[str]] = defaultdict(list)
    for name in classes:
        if DECIMAL.fullmatch(name):  # a class name that is a number
            by_value[Decimal(name)].append(name)  # equal values hash alike (1 and 1.0), exactly, whatever the digits
    return tuple(
        f"classes {' and '.join(names)} are the same number written {len(names)} ways, so they are {len(names)} classes; "
        f"give them one name if they are one"
        for names in by_value.values() if len(names) > 1
    )


def case_clashes(classes: tuple[str, ...]) -> tuple[str, ...]:
    by_folded: dict[str, list[str]] = defaultdict(list)
    for name in classes:
        by_folded[name.casefold()].append(name)
    return tuple(
        f"classes {' and '.join(names)} differ only in case, so they are {len(names)} classes; rename them to one name if they are one"
        for names in by_folded.values() if len(names) > 1
    )


class ImageData(LabelledData):
    """Samples are (image path, class index)."""

    @property
    def no_test_hint(self) -> str:
        if self.layout.startswith(MANIFEST_KINDS):  # a manifest's images are all train or val: held-out ones are another file
            return "list held-out images in a manifest of their own and score it whole: thaw evaluate RUN THAT_MANIFEST"
        return "put test images in a test/ folder beside train/"


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def candidate_files(folder: Path) -> list[Path]:
    """Every file below `folder` that thaw tries to read as an image, whatever its extension; hidden files and whatever
    lies in hidden folders aside (.git, .ipynb_checkpoints). A link to nowhere is kept, so that it is reported (and
    refused with --strict) like any unreadable file; so is a folder inside that cannot be listed (another user's),
    which rglob passed over without a word. `folder` itself unlistable raises its PermissionError (one line in the CLI).
    Links to folders are followed (their images were passed over without a word), each folder once, real folders
    before links to them; a link to `folder` or a folder it lies in (`up -> ../..`, `/`) is not: it would list
    everything around the data."""
    found: list[Path] = []
    listed: set[str] = set()
    around = Path(os.path.realpath(folder))

    def unlistable(error: OSError) -> None:
        if Path(error.filename) == folder:
            raise error
        found.append(Path(error.filename))

    for parent, folders, files in os.walk(folder, onerror=unlistable, followlinks=True):
        real = os.path.realpath(parent)
        if real in listed or (listed and around.is_relative_to(real)):  # reached twice, or a link to a folder around
            folders[:] = []
            continue
        listed.add(real)
        shown = [name for name in folders if not name.startswith(".")]
        folders[:] = sorted(shown, key=lambda name: (os.path.islink(os.path.join(parent, name)), name))
        paths = (Path(parent) / name for name in files if not name.startswith("."))
        found.extend(path for path in paths if not _listable_folder(path))
    return sorted(found)


def _listable_folder(path: Path) -> bool:
    """Whatever is not a folder is listed, so that the first look reads it or skips it with a reason: a link to
    nowhere, a named pipe or a socket (which were passed over without a word), or a name in a folder that may be read
    but not entered (mode 644, where is_dir() raises PermissionError)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _usable(files: list[Path], skipped: list[tuple[str, str]]) -> list[Path]:
    """Keep files that are decodable images by their header; list the rest with a reason."""
    usable = []
    for path in files:
        try:
            probe(path)
        except UnreadableImage as reason:
            skipped.append((str(path), str(reason)))
            continue
        usable.append(path)
    return usable


def _scan_split(split_dir: Path, skipped: list[tuple[str, str]]) -> dict[str, list[Path]]:
    by_class = {}
    for folder in _class_folders(split_dir):
        by_class[folder.name] = _usable(candidate_files(folder), skipped)
    return by_class


def unicode_form_hint(these: list[str], known: list[str] | tuple[str, ...], where: str) -> str:
    """A sentence for names of `these` that match one of `known` only once both are Unicode-normalised: the same
    letters, written apart (é as one code point in one folder, e plus an accent in the other; macOS tools write the
    latter). Shown escaped, as on screen the two look alike. Empty where there are none."""
    normal = {unicodedata.normalize("NFC", name): name for name in known}
    twins = [(name, normal[unicodedata.normalize("NFC", name)]) for name in these
             if name not in known and unicodedata.normalize("NFC", name) in normal]
    if not twins:
        return ""
    pairs = ", ".join(f"{ascii(name)} and {where}'s {ascii(match)}" for name, match in twins)
    return (f"; {pairs} are the same letters encoded otherwise (an accent as a character of its own, as macOS tools may "
            "write names): rename one of them so the two names match")


def _in_two_classes(by_class: dict[str, list[Path]]) -> list[str]:
    """One image file in two class folders (a class folder that links to another, a file linked into both, by a
    symbolic or a hard link) would train under both labels; a manifest that lists a file twice is refused the same way.
    Copies with equal bytes are other files: the duplicate check warns of those."""
    classes_of: dict[tuple[int, int], dict[str, Path]] = defaultdict(dict)
    for label, files in by_class.items():
        for file in files:
            try:
                info = file.stat()
            except OSError:  # gone since it was read: its reader says so
                continue
            classes_of[(info.st_dev, info.st_ino)].setdefault(label, file)
    repeated = [f"{next(iter(found.values()))} ({', '.join(found)})" for found in classes_of.values() if len(found) > 1]
    if not repeated:
        return []
    count = f"{len(repeated)} image{'s are' if len(repeated) > 1 else ' is'}"
    return [f"{count} in more than one class folder (first: {repeated[0]}), as a class folder that links to another "
            "puts them; keep each image in one class folder"]


def _check_classes(
    splits: dict[str, dict[str, list[Path]]], root: Path, min_classes: int = 2, in_folders: bool = True,
    skipped: Sequence[tuple[str, str]] = (),
) -> tuple[str, ...]:
    """`in_folders`: the classes are folders, where one file may lie in two (a manifest checks its own rows).
    `skipped`: the files left out as unreadable, named where a class folder holds only such files."""
    problems = []
    reference_name, reference = next(iter(splits.items()))
    for name, by_class in splits.items():
        empty = [c for c, files in by_class.items() if not files]
        if empty:  # named by split where there are splits; class folders alone are `root`'s, which names itself
            problems.append(f"{name + ': ' if name else ''}class folders with no readable images: {', '.join(empty)}"
                            + (_unread_in(root / name, empty, skipped) if in_folders else ""))
        problems += [f"{name + ': ' if name else ''}{said}" for said in (_in_two_classes(by_class) if in_folders else [])]
        # A test set of some of the classes trains nothing and is scored as evaluate scores any such set.
        if set(by_class) != set(reference) and not (SPLIT_NAMES.get(name.lower()) == "test" and set(by_class) < set(reference)):
            only_here = sorted(set(by_class) - set(reference))
            missing = sorted(set(reference) - set(by_class))
            if SPLIT_NAMES.get(name.lower()) == "test":  # some of the classes are fine there: the extra ones are the problem
                problems.append(
                    f"{name}/ holds classes that {reference_name}/ lacks ({only_here}), which no model trained on "
                    f"{reference_name}/ can predict; remove them from {name}/ or add them to {reference_name}/ (a test split "
                    f"may hold some of {reference_name}/'s classes)" + unicode_form_hint(only_here, list(reference), f"{reference_name}/")
                )
                continue
            problems.append(
                f"classes differ between {reference_name} and {name} (only in {name}: {only_here or 'none'}; "
                f"missing from {name}: {missing or 'none'}); give {name}/ the same class folders as {reference_name}/"
                + (f", or remove {name}/ to have a share of {reference_name}/ held out" if SPLIT_NAMES.get(name.lower()) == "val" else "")
                + unicode_form_hint(only_here, list(reference), f"{reference_name}/")
            )
    not_utf8 = [c.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for c in reference if not _is_utf8(c)]
    if not_utf8:  # an old zip's encoding: the name would reach the record, the plots and the report undecodable
        problems.append(f"class folder names that are not UTF-8: {', '.join(not_utf8)}; rename them")
    if not reference and min_classes == 1:  # data to score
        problems.append("found no class with readable images; there is nothing to score")
    elif len(reference) < min_classes:
        found = f"{len(reference)} class ({', '.join(reference)})" if reference else "no class"
        problems.append(f"found {found}; a classifier needs at least 2")
    if problems:
        raise ThawError(f"{root}: " + "; ".join(problems))
    return tuple(sorted(reference))


def _unread_in(split_dir: Path, classes: list[str], skipped: Sequence[tuple[str, str]]) -> str:
    """What the empty class folders held that did not read (a .heic no decoder here reads, say): the first, and how many."""
    unread = [(path, reason) for path, reason in skipped if any(Path(path).is_relative_to(split_dir / name) for name in classes)]
    if not unread:
        return ""
    path, reason = unread[0]
    return f" ({len(unread)} file(s) there did not read, first {path}: {reason})"


def _is_utf8(name: str) -> bool:
    """Whether a name read from the file system is valid UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _samples(by_class: dict[str, list[Path]], classes: tuple[str, ...]) -> tuple[Sample, ...]:
    index = {name: i for i, name in enumerate(classes)}
    return tuple((path, index[name]) for name in classes for path in by_class.get(name, []))


def as_percent(fraction: float) -> str:
    """A held-out share as a percentage, to 3 digits, or more where 3 would round a share below 1 up to 100%:
    0.999 is 99.9% and 0.9996 is 99.96%, not the 100% that read beside 3 train images."""
    percent = fraction * 100
    digits = 3
    while percent < 100 and float(f"{percent:.{digits}g}") >= 100 and digits < 17:  # 17 digits tell any float from 100
        digits += 1
    return f"{percent:.{digits}g}%"


def held_out_said(asked: float, kept: int, held: int, what: str = "held out", whole: str = "images per class") -> str:
    """'20% held out': the share asked, or the share really held out where `whole` samples per class (one held out at
    the least where a class has two or more, one kept to train on) put it far from the one asked: `--val-split 1e-9`
    said '1e-07% held out' beside 9 train and 3 val images."""
    real = held / (kept + held) if kept + held else asked
    near = asked / 1.5 <= real <= asked * 1.5 and (1 - asked) / 1.5 <= 1 - real <= (1 - asked) * 1.5
    if near:
        return f"{as_percent(asked)} {what}"
    return f"{as_percent(real)} {what} ({as_percent(asked)} asked, in whole {whole})"


def split_off_val(
    samples: list[Sample], fraction: float, seed: int, source: Path, rows_left: str = "", min_classes: int = 2,
    same: Callable[[Sample], Hashable] | None = None, within: tuple[str, ...] = ("samples", "groups"),
) -> tuple[list[Sample], list[Sample]]:
    """stratified_split for the val set a run chooses its epoch by: none at all (every class a single sample, or with
    `same` a single key) would train a run that reports val accuracy 0 and delivers an arbitrary epoch. Refused,
    except in data to score (`min_classes` 1), which is scored whole."""
    train, val = stratified_split(samples, fraction, seed, same, within)
    if not val and min_classes > 1:
        count, purpose = (3, "one each to train on, validate and test; or lower --test-split") if rows_left else (2, "one to train on and one to validate")
        if same is not None and len(samples) > len({label for _, label in samples}):  # not a sample per class: copies
            raise ThawError(f"{source}: no row is left for val: every label's rows are copies of one text{rows_left}; a label needs {count} different texts at the least, {purpose}")
        raise ThawError(f"{source}: no sample is left for val: every class has a single one{rows_left}; a class needs {count} at the least, {purpose}")
    return train, val


def classes_not_held_out(classes: tuple[str, ...], val: list[Sample], min_classes: int = 2) -> tuple[str, ...]:
    """A class of a single image stays in train (stratified_split): the val share held out, which chooses the epoch
    delivered, then has none of it, and its scores say nothing of that class. Said for data to train on, not to score."""
    present = {label for _, label in val}
    missing = [name for index, name in enumerate(classes) if index not in present]
    if not missing or min_classes < 2:
        return ()
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return (
        f"val has no image of class(es) {', '.join(missing[:5])}{more}: each has a single training image, kept to train on, so "
        "val scores say nothing of them; add images of them",
    )


def stratified_split(
    samples: list[Sample], fraction: float, seed: int, same: Callable[[Sample], Hashable] | None = None,
    within: tuple[str, ...] = ("samples", "groups"),
) -> tuple[list[Sample], list[Sample]]:
    """A seeded split that keeps each class's share, with at least one sample per class on each side (a class of one
    sample: on the training side). `same`: samples of one key (a text's copies) go to one side together, so that
    nothing held out is also trained on; a class's groups are then held out in a seeded order while they fit its
    share of samples and its share of groups (so one text copied 500 times does not send every other text of its
    class to the first split held out). `within` names the shares held to: one of them alone is the rule of runs
    split before (thaw.data.text.SPLIT_RULES), rebuilt for them.
    Without copies this is the split without `same`: groups of one sample, shuffled as the samples were."""
    if not 0 < fraction < 1:
        raise ThawError(f"val_split (--val-split) must be above 0 and below 1, like 0.2, got {fraction}")
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_label[sample[1]].append(sample)
    rng = random.Random(seed)
    train, held_out = [], []
    for label in sorted(by_label):
        groups = _groups(sorted(by_label[label]), same)
        rng.shuffle(groups)
        count = len(by_label[label])
        most_samples = _share(count, fraction) if "samples" in within else count
        most_groups = _share(len(groups), fraction) if "groups" in within else len(groups)
        held = _held_groups(groups, most_samples, most_groups)
        held_out += [sample for index in sorted(held) for sample in groups[index]]
        train += [sample for index, group in enumerate(groups) if index not in held for sample in group]
    return train, held_out


def _share(count: int, fraction: float) -> int:
    """`fraction` of `count` held out, rounded: at least one, and one fewer than all (one is left to train on)."""
    return min(max(1, round(count * fraction)), count - 1)


def _held_groups(groups: list[list[Sample]], share: int, most_groups: int) -> set[int]:
    """The groups held out: in order, each that fits in what is left of `share` samples, up to `most_groups` of them;
    where none fits (a class of a few large groups), its smallest, if another group is left to train on."""
    held, left = set(), share
    for index, group in enumerate(groups):
        if len(held) == most_groups:
            break
        if len(group) <= left:
            held.add(index)
            left -= len(group)
    if not held and len(groups) > 1:
        held.add(min(range(len(groups)), key=lambda index: len(groups[index])))
    return held


def _groups(samples: list[Sample], same: Callable[[Sample], Hashable] | None) -> list[list[Sample]]:
    """The samples in groups of one key, in the order of each group's first sample (each sample its own group
    without `same`)."""
    if same is None:
        return [[sample] for sample in samples]
    groups: dict[Hashable, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(same(sample), []).append(sample)
    return list(groups.values())


def would_be_read(root: Path, path: Path, is_file: bool = False) -> bool:
    """Whether a folder (or, `is_file`, a file) at `path` would be read as data by discover(root): it lies under the
    image folder `root`, not in a hidden folder, (beside a train/ folder as written, which fixes the layout) in a
    split, and a file within a class folder: a file beside the class folders (or the splits) is not read."""
    try:
        if not root.is_dir():
            return False  # a manifest lists its own files
        parts = path.resolve().relative_to(root.resolve()).parts
        train_fixes_layout = (root / "train").is_dir()
    except (ValueError, OSError, RuntimeError):  # not under it; a name the file system refuses, or a loop of links
        return False
    if not parts:
        return not is_file
    if parts[0].startswith(".") or (is_file and _hidden(Path(*parts))):
        return False
    if train_fixes_layout:
        return parts[0].lower() in SPLIT_NAMES and (not is_file or len(parts) >= 3)  # train/CLASS/file
    return not is_file or len(parts) >= 2  # CLASS/file


def file_would_be_read(root: Path, file: Path) -> bool:
    """Whether writing `file` (and any folders it needs made) puts something discover(root) reads: the file in a class
    folder, or a new folder where a class folder would be (a class of no images)."""
    try:
        made = next((folder for folder in reversed(file.parents) if not folder.exists()), None)
    except (OSError, ValueError):  # a name the file system refuses: the write itself says so
        return False
    return would_be_read(root, file, is_file=True) or (made is not None and would_be_read(root, made))


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders discover(root) reads (train, val, test), or none: a manifest, class folders, or no folder
    (or one that cannot be listed: discover says why)."""
    try:
        return _split_folders(root) if root.is_dir() else {}
    except OSError:
        return {}


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders in `root` by split (train, val, test; train first), whatever their case. Two folders for one
    split are refused: scoring on the one thaw happened to pick would be a silent guess."""
    entries = list(root.iterdir())
    broken = [p for p in entries if p.name.lower() in SPLIT_NAMES and _dangling(p)]
    if broken:  # val/ linked to a disk not mounted: training on a share of train/ instead would go unnoticed
        raise ThawError(f"{broken[0]} is a link to {os.readlink(broken[0])}, which does not exist; fix the link or remove it")
    folders = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    # train/ as written says split folders, as it always has; another case only where every folder is a split's name:
    # Bus/, Car/ and Train/ are the classes of a vehicle set, not a train split beside two classes.
    # train/ by its name on disk: a case-insensitive file system (macOS, Windows) finds Train/ as train/ too
    if not any(folder.name == "train" for folder in folders) and not all(folder.name.lower() in SPLIT_NAMES for folder in folders):
        return {}
    found: dict[str, list[Path]] = defaultdict(list)
    for folder in folders:
        if folder.name.lower() in SPLIT_NAMES:
            found[SPLIT_NAMES[folder.name.lower()]].append(folder)
    clashes = [(split, folders) for split, folders in found.items() if len(folders) > 1]
    if "train" in found and clashes:
        split, folders = clashes[0]
        names = " and ".join(f"{folder.name}/" for folder in folders)
        raise ThawError(f"{root} holds both {names}, two {split} splits; keep one (merge them, or rename the other to a name thaw ignores)")
    return {split: found[split][0] for split in ("train", "val", "test") if split in found}


def _from_split_folders(root: Path, folders: dict[str, Path], val_split: float, seed: int, min_classes: int) -> ImageData:
    """train/ with val/ as given; without val/, a seeded stratified share of train/ is held out as val."""
    for folder in folders.values():
        _check_holds_class_folders(folder)
    skipped: list[tuple[str, str]] = []
    splits = {split: _scan_split(folder, skipped) for split, folder in folders.items()}
    classes = _check_classes({folders[split].name: by_class for split, by_class in splits.items()}, root, min_classes, skipped=skipped)  # named as on disk
    train = _samples(splits["train"], classes)
    test = _samples(splits["test"], classes) if "test" in splits else None
    if "val" in splits:
        named = ", ".join(f"{folder.name}/" for folder in folders.values())  # as on disk: VAL/ or valid/, say
        val, layout = _samples(splits["val"], classes), f"split folders ({named})"
    else:
        kept, held_out = split_off_val(list(train), val_split, seed, folders["train"], min_classes=min_classes)
        train, val = tuple(kept), tuple(held_out)
        given = "train/test" if test is not None else "train only"
        layout = f"split folders ({given}), {held_out_said(val_split, len(train), len(val), 'of train held out as val')} (seed {seed})"
    held_out = () if "val" in splits else classes_not_held_out(classes, val, min_classes)
    # Data to score (min_classes 1) trains nothing: no copy of training images to warn of, so no file read for it.
    # Under torchrun only the first process says the cautions, so only it reads files for them.
    held = {"val": val if "val" in splits else (), "test": test or ()}
    copies = copies_of_training_images(train, held) if min_classes >= 2 and os.environ.get("RANK", "0") == "0" else ()
    return ImageData(
        classes, train, val, test, layout, tuple(skipped), split_folders=True, val_from_folder="val" in splits,
        cautions=_unread_splits(root, classes) + _loose_images(*folders.values()) + held_out + copies,
    )


def _loose_images(*folders: Path) -> tuple[str, ...]:
    """A caution for image files straight in a folder of class folders (train/, or DATA/): no class folder gives
    them a label, so they are not read, which a user who dropped new photos there would not know."""
    said = []
    for folder in folders:
        try:
            loose = [path for path in folder.iterdir() if not path.name.startswith(".") and _is_image_file(path)]
        except OSError:  # unlistable: said where it is read
            continue
        if loose:
            said.append(f"{folder}/ holds {len(loose)} image file(s) beside its class folders (first: {loose[0].name}); "
                        "they have no class, so they are not read: move them into a class folder to use them")
    return tuple(said)


HEAD_BYTES = 4096  # read of each file whose size a file on the other side has, before any file is read whole
MAX_HEAD_READS = 20_000  # past this, the check is left out: on an ImageNet-sized set a fifth of the files share a size


def _digest(path: Path, limit: int | None = None) -> bytes | None:
    """blake2b of the file's first `limit` bytes (all of it without one); None where it cannot be read now: the
    decoder will say why, in its own words."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "blake2b").digest() if limit is None else hashlib.blake2b(file.read(limit)).digest()
    except OSError:
        return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _copies(held: dict[str, list[Path]], train: list[Path]) -> dict[str, list[tuple[Path, Path]]]:
    """Per held-out split, its (file, training file) pairs of the same bytes. Files are compared by size, then by
    their first HEAD_BYTES, and only those still alike are read whole: uncompressed images of one shape (BMP, TIFF)
    all have one size, and reading each whole would read the data set again before training."""
    sizes = {path: _size(path) for path in [*train, *(path for paths in held.values() for path in paths)]}
    shared = ({sizes[path] for paths in held.values() for path in paths} & {sizes[path] for path in train}) - {None}
    alike_in_size = [path for path, size in sizes.items() if size in shared]
    if not alike_in_size or len(alike_in_size) > MAX_HEAD_READS:
        return {}
    heads = {path: (sizes[path], _digest(path, HEAD_BYTES)) for path in alike_in_size}
    held_heads = {heads[path] for paths in held.values() for path in paths if path in heads}
    whole = {_digest(path): path for path in train if heads.get(path) in held_heads}
    whole.pop(None, None)
    train_heads = {heads[path] for path in train if path in heads}
    return {
        name: [(path, whole[digest]) for path in paths if heads.get(path) in train_heads and (digest := _digest(path)) in whole]
        for name, paths in held.items()
    }


def copies_of_training_images(train: tuple[Sample, ...], held: dict[str, tuple[Sample, ...]]) -> tuple[str, ...]:
    """A caution per held-out split holding byte-for-byte copies of training images (val/ made by copying train/, or
    photos filed twice): their scores count what the model memorised, and val's choose the epoch delivered. A split
    without copies costs a stat per file and HEAD_BYTES of each file whose size the other side has (left out past
    MAX_HEAD_READS such files)."""
    paths = {name: [path for path, _ in samples] for name, samples in held.items() if samples}
    found = _copies(paths, [path for path, _ in train]) if paths else {}
    cautions = []
    for name, copies in found.items():
        if copies:
            held_path, train_path = copies[0]
            purpose = "; val's choose the epoch delivered" if name == "val" else ""
            cautions.append(
                f"{len(copies)} of {len(paths[name])} {name} images are copies of training images (the same bytes, such as "
                f"{held_path} and {train_path}): their scores count what the model memorised{purpose}; keep each image "
                "in one split"
            )
    return tuple(cautions)


def _check_holds_class_folders(split_dir: Path) -> None:
    """Images straight in train/ (no class folders) carry no labels: said as such, not as 'no class found'."""
    if _class_folders(split_dir):
        return
    loose = [path for path in split_dir.iterdir() if _is_image_file(path)]
    if loose and SPLIT_NAMES.get(split_dir.name.lower()) == "test":  # Kaggle's layout: the images to predict, unlabelled
        raise ThawError(
            f"{split_dir} holds {len(loose)} image(s) but no class folders: unlabelled images cannot score a model; "
            f"move it out of {split_dir.parent} (or train on {split_dir.parent / 'train'} alone), and label its images "
            f"with thaw predict RUN {split_dir}"
        )
    if loose:
        # bus/, car/ and train/ of images: a vehicle set whose class train reads as the split (its other cases stay
        # classes). One such folder beside it is more likely Kaggle's unlabelled test1/ or train_masks/: no hint
        others = _image_folders_beside(split_dir) if split_dir.name == "train" else []
        hint = (f"; if {split_dir.name}/ is a class beside {', '.join(f'{name}/' for name in others[:3])}, name it Train/: "
                "thaw reads a split's name in another case as a class where other folders are no split's") if len(others) >= 2 else ""
        raise ThawError(
            f"{split_dir} holds {len(loose)} image(s) but no class folders, so no labels; "
            f"put each class's images in a folder named after it: {split_dir}/CLASS/IMAGE{hint}"
        )


def _image_folders_beside(split_dir: Path) -> list[str]:
    """The names of the folders next to split_dir that are no split's and hold images only: candidate classes."""
    return [
        folder.name
        for folder in _class_folders(split_dir.parent)
        if folder.name.lower() not in SPLIT_NAMES and _holds_images_only(folder)
    ]


def _holds_images_only(folder: Path) -> bool:
    """Images straight in `folder`, and no folder of classes beside them."""
    try:
        return folder.is_dir() and not _class_folders(folder) and holds_image_files(folder)
    except OSError:  # unlistable: said where it is read
        return False


def holds_image_files(folder: Path) -> bool:
    """Whether image files (by their suffix) lie straight in `folder`; False for a folder that cannot be listed."""
    try:
        return folder.is_dir() and any(_is_image_file(path) for path in folder.iterdir())
    except OSError:
        return False


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _unread_splits(root: Path, classes: tuple[str, ...]) -> tuple[str, ...]:
    """Folders beside train/ whose names are no split's (dev/, holdout/) but which look like a split: thaw does not
    read them, and the user may have meant one as val or test. Folders of anything else (runs/, docs/; mlruns/ with
    its experiments 0/ and 1/ beside classes named 0 and 1) are not mentioned."""
    unread, loose = [], []
    known = {name.casefold() for name in classes}
    for folder in _class_folders(root):
        if folder.name.lower() not in SPLIT_NAMES and _looks_like_split(folder, classes):
            unread.append(f"{folder.name}/")
        elif folder.name.casefold() in known and _holds_images_only(folder):  # unlabeled/ or figures/ are no class's
            loose.append(f"{folder.name}/")
    said = ()
    if unread:
        said += (
            f"{', '.join(unread)} beside train/ {'is' if len(unread) == 1 else 'are'} not read: thaw reads train/, val/ (or valid/, "
            "validation/) and test/; rename a folder to val/ or test/ if it is one of those",
        )
    if loose:  # cat/ and dog/ of images beside train/cat/: classes left out of the split layout
        said += (
            f"{', '.join(loose[:5])}{' ...' if len(loose) > 5 else ''} beside train/ {'holds' if len(loose) == 1 else 'hold'} images that are not read: with train/ "
            "thaw reads the classes in train/, val/ and test/; move them into train/ (train/CLASS/IMAGE) to train on them",
        )
    return said


def _looks_like_split(folder: Path, classes: tuple[str, ...]) -> bool:
    """Every folder in it named as a class (in any case), two or more of them (one, where there is one class), and
    images directly in one of them."""
    known = {name.casefold() for name in classes}
    try:
        inside = _class_folders(folder)
        if not inside or any(child.name.casefold() not in known for child in inside) or len(inside) < min(2, len(known)):
            return False
        return any(_is_image_file(path) for child in inside for path in child.iterdir())
    except OSError:  # unlistable: not data thaw could read either way
        return False


def _from_class_folders(root: Path, val_split: float, seed: int, min_classes: int) -> ImageData:
    if min_classes > 1:  # data to score may well be one class folder, with folders of its own
        _check_not_one_level_up(root)
    skipped: list[tuple[str, str]] = []
    by_class = _scan_split(root, skipped)
    classes = _check_classes({"": by_class}, root, min_classes, skipped=skipped)
    train, val = split_off_val(list(_samples(by_class, classes)), val_split, seed, root, min_classes=min_classes)
    layout = f"class folders, {held_out_said(val_split, len(train), len(val))} (seed {seed})"
    cautions = _loose_images(root) + classes_not_held_out(classes, val, min_classes)
    return ImageData(classes, tuple(train), tuple(val), None, layout, tuple(skipped), cautions=cautions)


def _check_not_one_level_up(root: Path) -> None:
    """DATA/animals/{cat,dog}/ passed as DATA would be one class, animals, of every image: name the folder meant."""
    only = _class_folders(root)
    inner = _class_folders(only[0]) if len(only) == 1 else []
    if len(inner) >= 2:
        names = ", ".join(f"{folder.name}/" for folder in inner[:5]) + (", ..." if len(inner) > 5 else "")
        raise ThawError(f"{root} holds one folder, {only[0].name}/, whose folders ({names}) look like the classes; pass {only[0]}")


# A manifest's separator by its suffix: .tsv and .tab are what spreadsheets and pandas write tab-separated tables as.
MANIFEST_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
KIND_BY_DELIMITER = {",": "CSV", "\t": "TSV"}
MANIFEST_KINDS = tuple(f"{kind} manifest" for kind in KIND_BY_DELIMITER.values())  # how a manifest's layout line starts


def _manifest_columns(path: Path, first: str = "path", second: str = "label") -> str:
    """Two columns as the manifest writes them, for the messages: path,label, or path<TAB>label."""
    return f"{first}{',' if _is_comma_separated(path) else '<TAB>'}{second}"


def _manifest_kind(path: Path) -> str:
    return KIND_BY_DELIMITER[MANIFEST_DELIMITERS[path.suffix.lower()]]


def _is_comma_separated(path: Path) -> bool:
    return MANIFEST_DELIMITERS[path.suffix.lower()] == ","


def _manifest_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The non-comment rows of a manifest with the line each ends on; a file that is not UTF-8 CSV (or TSV) is one
    line saying so."""
    kind, columns = _manifest_kind(path), _manifest_columns(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=MANIFEST_DELIMITERS[path.suffix.lower()])
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as error:
        raise ThawError(f"{path} is not UTF-8 text (byte {error.start}); save the manifest as UTF-8 {kind} ({columns})") from None
    except csv.Error as error:
        raise ThawError(f"{path} is not a readable {kind} manifest ({error}); expected lines of {columns}") from None
    except OSError as error:
        raise ThawError(f"cannot read {path} ({error.strerror or error})") from None
    _check_quotes_closed(path, rows)  # comments too: a quote opened in one takes the rows after it
    return [(line, row) for line, row in rows if is_listed_row(row)]


def is_listed_row(row: list[str]) -> bool:
    """A manifest row that lists something: no comment (#...), and no line of blanks (a spreadsheet's last row, a stray
    tab), which is an empty line as a line with nothing is."""
    return any(cell.strip() for cell in row) and not row[0].startswith("#")


def _check_quotes_closed(path: Path, rows: list[tuple[int, list[str]]]) -> None:
    """A quote never closed (`"photo.jpg,cat`) makes the reader take the lines after it as one field: said at the
    line it opens on, not as a count of columns at the file's end. A quoted path that holds a line break (RFC 4180
    quotes one so) and names a file, in a row of two columns, is that file: a Linux file name may hold one."""
    for line, row in rows:
        breaks = sum(_line_breaks(cell) for cell in row)
        if not breaks or (len(row) == 2 and not _line_breaks(row[1]) and answers((path.parent / row[0].strip()).is_file)):
            continue
        if any(cell.endswith(("\n", "\r")) for cell in row):  # only the file's end closed it: its last break is in the field
            raise ThawError(f"{path}: line {line - breaks + 1}: a quote (\") opened there is never closed, so every line from there "
                            "to the end reads as one field; close it on its line, or remove it")
        raise ThawError(f"{path}: line {line - breaks}: a quote (\") opened there runs on to line {line}, so those lines read "
                        "as one field; close it on its line, or remove it")


def _line_breaks(text: str) -> int:
    return text.count("\n") + text.count("\r") - text.count("\r\n")


SEPARATORS = ((",", "commas", "name it .csv"), ("\t", "tabs", "name it .tsv"), (";", "semicolons", "save it with commas as .csv"))


def _check_separator(path: Path, rows: list[tuple[int, list[str]]]) -> None:
    """A .tsv written with commas (or a .csv with tabs, or a spreadsheet's semicolons) reads as one column a line: one
    line naming the separator its lines hold, not an 'expected path,label' for each of them."""
    if not rows or any(len(row) >= 2 for _, row in rows):
        return
    own = MANIFEST_DELIMITERS[path.suffix.lower()]  # a quoted "a,b.png" alone on its line holds the file's own: no hint
    # most lines hold it: one path with a semicolon in a list whose labels were forgotten is no separator
    found = next(((name, fix) for separator, name, fix in SEPARATORS
                  if separator != own and 2 * sum(separator in row[0] for _, row in rows) > len(rows)), None)
    if found is not None:
        expected = "commas" if _is_comma_separated(path) else "tabs"
        raise ThawError(f"{path}: its lines are separated by {found[0]}, and a {path.suffix} manifest's by {expected}; {found[1]}")


def _why_missing(path: Path, entries: list[tuple[Path, str]], missing: list[str], columns: str) -> str:
    """The likely reason listed files are missing: paths written with Windows separators (images\\a.png: one file
    name here, where \\ is a letter like any other); where every one is missing, the columns the other way round
    (label,path without its header), or paths written from the working folder, where the manifest's own folder is
    what they are read from."""
    folder = str(path.parent) + os.sep
    written = missing[0][len(folder):] if missing[0].startswith(folder) else missing[0]  # as the row has it
    if os.sep == "/" and "\\" in written and answers((path.parent / written.replace("\\", "/")).is_file):
        return "; its paths are written with \\ (Windows): write them with / (images/a.png), which Windows reads too"
    if len(missing) < len(entries):
        return ""
    if answers((path.parent / entries[0][1]).is_file):
        return f"; the columns look swapped: thaw reads {columns}"
    written = entries[0][0].relative_to(path.parent) if entries[0][0].is_relative_to(path.parent) else None
    try:
        elsewhere = path.parent.resolve() != Path.cwd().resolve()
    except OSError:  # the working folder was removed: no paths are read from it
        return ""
    if written is not None and not written.is_absolute() and elsewhere and answers(written.is_file):
        return f"; a relative path is read from the manifest's folder ({path.parent}), not the working folder: write the paths from there"
    return ""


def _from_manifest(path: Path, val_split: float, seed: int, min_classes: int) -> ImageData:
    rows, columns = _manifest_rows(path), _manifest_columns(path)
    _check_separator(path, rows)
    header = [c.strip().lower() for c in rows[0][1][:2]] if rows else []
    if header == ["label", "path"]:
        raise ThawError(f"{path}: the header is {_manifest_columns(path, 'label', 'path')}; thaw reads {columns}: swap the two columns")
    if header == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise ThawError(f"{path} lists no images; expected lines of {columns} (a header line {columns} may come first)")
    problems = [f"line {line}: expected {columns}" for line, row in rows if len(row) < 2]
    problems += [f"line {line}: empty label" for line, row in rows if len(row) >= 2 and not row[1].strip()]
    # A third column (a split, a second label) or a path with an unquoted comma would be dropped without a word.
    problems += [
        f"line {line}: {len(row)} columns, expected {columns} (remove the others, or quote a path or label that holds a "
        f"{'comma' if _is_comma_separated(path) else 'tab'})"
        for line, row in rows if any(cell.strip() for cell in row[2:])
    ]
    problems += [f"line {line}: empty path" for line, row in rows if len(row) >= 2 and not row[0].strip()]
    entries = [(path.parent / row[0].strip(), row[1].strip()) for _, row in rows if len(row) >= 2 and row[0].strip()]
    folders = [str(p) for p, _ in entries if answers(p.is_dir)]
    if folders:
        many = len(folders) > 1
        problems.append(f"{len(folders)} listed path{'s are folders' if many else ' is a folder'}, not {'image files' if many else 'an image file'} "
                        f"(first: {on_one_line(folders[0])})")
    missing = [str(p) for p, _ in entries if not answers(p.exists)]
    if missing:
        problems.append(f"{len(missing)} listed {'files do not' if len(missing) > 1 else 'file does not'} exist (first: {on_one_line(missing[0])})"
                        + _why_missing(path, entries, missing, columns))
    listings: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for file, label in entries:
        # images/a.png, ./images/a.png, images/../images/a.png, its absolute path and a link to it are one file
        listings[os.path.realpath(file)].append((file, label))
    # a file listed twice would be two samples, which the split may put one in train and one in val
    repeated = [f"{on_one_line(str(listed[0][0]))} ({', '.join(label for _, label in listed)})" for listed in listings.values() if len(listed) > 1]
    if repeated:
        problems.append(f"{len(repeated)} {'files are' if len(repeated) > 1 else 'file is'} listed more than once (first: {repeated[0]}); "
                        "list each file once, with one label")
    if problems:
        raise ThawError(f"{path}: " + "; ".join(problems[:5]))
    skipped: list[tuple[str, str]] = []
    usable = set(_usable([p for p, _ in entries], skipped))
    by_class: dict[str, list[Path]] = defaultdict(list)
    for file, label in entries:
        if file in usable:
            by_class[label].append(file)
    classes = _check_classes({"manifest": dict(by_class)}, path, min_classes, in_folders=False)
    train, val = split_off_val(list(_samples(by_class, classes)), val_split, seed, path, min_classes=min_classes)
    layout = f"{_manifest_kind(path)} manifest, {held_out_said(val_split, len(train), len(val))}"
    return ImageData(classes, tuple(train), tuple(val), None, layout, tuple(skipped), cautions=classes_not_held_out(classes, val, min_classes))


def discover(root: str | Path, *, val_split: float = 0.2, seed: int = 0, min_classes: int = 2) -> ImageData:
    """Find the dataset at `root`; see the module docstring for the layouts. `min_classes` 1: data to score, not to
    train on (a held-out folder of one of the run's classes)."""
    root = Path(root)
    if not root.exists():
        raise ThawError(f"data path {root} does not exist")
    special = special_file(root)
    if special:  # a manifest piped in by <(...), /dev/null: read once, it could not be read again on a resume
        raise ThawError(f"data path {root} is {special}, not a folder or a file; pass a folder, or save the manifest as a .csv file and pass that")
    if root.is_file():
        if root.suffix.lower() not in MANIFEST_DELIMITERS:
            raise ThawError(f"{root} is a file; pass a folder of class folders, a folder with train/ and val/, or a .csv (or .tsv) manifest")
        return _from_manifest(root, val_split, seed, min_classes)
    folders = _split_folders(root)
    if "train" in folders:
        return _from_split_folders(root, folders, val_split, seed, min_classes)
    if not _class_folders(root):
        raise ThawError(f"{root} holds no class folders; expected {root}/CLASS/IMAGE or {root}/train/CLASS/IMAGE")
    return _from_class_folders(root, val_split, seed, min_classes)


def classes_emptied_by_decoding(data: LabelledData, failed: dict[str, str]) -> str:
    """Classes every train (or val) image of which failed to decode, by path in `failed` (path: reason). A truncated
    JPEG's header reads, so listing keeps the file and only decoding finds it broken; a class of such files would train
    (or be scored) with no image of it. The listing refuses a class folder with no readable images, and this is the
    same refusal once decoding shows it. Empty where no class lost every image."""
    problems = []
    for split in ("train", "val") if failed else ():
        samples = data.split(split)
        readable = {label for path, label in samples if str(path) not in failed}
        emptied = sorted({label for _, label in samples} - readable)
        if emptied:
            first = next(str(path) for path, label in samples if label == emptied[0])
            names = ", ".join(data.classes[label] for label in emptied)
            problems.append(f"{split}: class{'es' if len(emptied) > 1 else ''} with no image that decodes: {names} "
                            f"(first: {on_one_line(first)}: {failed[first]})")
    if not problems:
        return ""
    return "; ".join(problems) + "; replace or remove the broken files, then train again"


def describe_skipped(skipped: tuple[tuple[str, str], ...], limit: int = 5, rows: bool = False) -> str:
    """`rows`: what was skipped are a text table's rows, left out for being empty or short, not unreadable files."""
    what = "row(s) of the table" if rows else "unreadable file(s)"
    shown = "; ".join(f"{on_one_line(str(path))} ({reason})" for path, reason in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} {what}: {shown}{more}"
