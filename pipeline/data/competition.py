"""Reading a competition folder and building the embedded ELPV competition.

A competition is read into one ``Competition`` object whatever its layout (a Kaggle CSV,
class-per-subfolder, the Boostcamp mask layout), so every later stage sees the same
tables: ``train`` (id, path, target, group, head and aux columns) and ``test`` (id, path)
in the sample submission's order. Decoding the images is ``pipeline.data.images``' job.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import layout
from pipeline.config import Config
from pipeline.data.images import IMAGE_EXTENSIONS, index_images
from pipeline.errors import DataError
from pipeline.formula import eval_formula

ELPV_CLASSES = {0.0: "p000", 1 / 3: "p033", 2 / 3: "p067", 1.0: "p100"}  # text order = defect order


@dataclass
class Competition:
    train: pd.DataFrame  # id, path, target, [group], [head cols], [aux cols]
    test: pd.DataFrame  # id, path, in the sample submission's order
    class_names: list[str]
    id_col: str
    target_col: str
    sample_submission: pd.DataFrame
    solution: pd.DataFrame | None = None
    heads: dict[str, list[str]] = field(default_factory=dict)  # head column -> its class names
    aux: dict[str, list[str]] = field(default_factory=dict)
    compose: str | None = None  # formula from head values to the target's value


def sorted_classes(values) -> list[str]:
    """Class names in a fixed order: numeric order when every label is a number, else text order."""
    names = sorted({str(v) for v in values})
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def label_text(value) -> str:
    """A label as the class name it stands for (``3.0`` read by pandas is class ``3``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ---------------------------------------------------------------- the embedded ELPV competition

def build_elpv(cfg: Config) -> Path:
    """Write a Kaggle-style competition folder from the ``elpv-dataset`` package.

    A seeded split stratified on defect class x cell type: about 80% train, the rest test,
    whose labels go only into solution.csv with a stratified Public/Private ``Usage``.
    Returns the folder; an existing complete folder built with the same settings is reused.
    """
    from sklearn.model_selection import train_test_split

    from pipeline.artifacts import atomic_dir, write_csv

    target = layout.competition_dir(cfg)
    settings = {"version": 2, "elpv_size": cfg.data.elpv_size, "test_fraction": cfg.data.elpv_test_fraction,
                "seed": cfg.data.elpv_seed}
    marker = target / "elpv.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return target
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("data.source is 'elpv' but the elpv-dataset package is not installed "
                        "(pip install elpv-dataset)") from None
    package_dir = Path(elpv_dataset.__file__).parent / "data"
    labels = pd.read_csv(package_dir / "labels.csv", sep=r"\s+", header=None, names=["path", "probability", "type"])
    labels["id"] = labels["path"].map(lambda p: Path(p).stem)
    labels["defect"] = labels["probability"].map(lambda p: min(ELPV_CLASSES.items(), key=lambda kv: abs(kv[0] - p))[1])
    strata = labels["defect"] + "_" + labels["type"]
    try:
        if cfg.data.elpv_size and cfg.data.elpv_size < len(labels):
            labels, _ = train_test_split(labels, train_size=cfg.data.elpv_size, stratify=strata,
                                         random_state=cfg.data.elpv_seed)
            strata = labels["defect"] + "_" + labels["type"]
        train, test = train_test_split(labels, test_size=cfg.data.elpv_test_fraction, stratify=strata,
                                       random_state=cfg.data.elpv_seed)
        test = test.sort_values("id")
        public, _ = train_test_split(test, test_size=0.5, stratify=test["defect"], random_state=cfg.data.elpv_seed)
    except ValueError as error:  # a stratum too small to split: too few images for the classes
        raise DataError(f"data.elpv_size {cfg.data.elpv_size} with data.elpv_test_fraction "
                        f"{cfg.data.elpv_test_fraction} leaves a class too few images to split into train, Public "
                        f"and Private test ({error}); use a larger data.elpv_size (240 or more)") from None
    with atomic_dir(target) as folder:
        for split, frame in (("train", train), ("test", test)):
            (folder / split).mkdir()
            for row in frame.itertuples():
                shutil.copyfile(package_dir / row.path, folder / split / f"{row.id}.png")
        write_csv(folder / "train.csv", train.sort_values("id")[["id", "defect", "type"]])
        write_csv(folder / "sample_submission.csv", pd.DataFrame({"id": test["id"], "defect": "p000"}))
        solution = test[["id", "defect"]].copy()
        solution["Usage"] = np.where(solution["id"].isin(public["id"]), "Public", "Private")
        write_csv(folder / "solution.csv", solution)
        (folder / "elpv.json").write_text(json.dumps(settings))
    return target


# ---------------------------------------------------------------- reading a competition folder

def competition_dir(cfg: Config) -> Path:
    if cfg.data.source == "elpv":
        return build_elpv(cfg)
    folder = Path(cfg.data.dir)
    if not folder.is_dir():
        raise DataError(f"competition folder {folder} (data.dir) does not exist")
    return folder


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{what} {path} cannot be read as CSV: {error}") from None
    if frame.empty:
        raise DataError(f"{what} {path} has no rows")
    return frame


def _require_columns(frame: pd.DataFrame, columns: list[str], path: Path, keys: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (set by {', '.join(keys)}); "
                        f"its columns are {list(frame.columns)}")


def _check_ids(ids: pd.Series, path: Path) -> None:
    if ids.isna().any():
        rows = [int(i) + 2 for i in np.flatnonzero(ids.isna())[:10]]
        raise DataError(f"{path} has empty ids on line(s) {rows}")
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        raise DataError(f"{path} has duplicate id(s) {duplicated[:10]}" + (" ..." if len(duplicated) > 10 else ""))


def _locate(ids: pd.Series, folder: Path, what: str) -> list[Path]:
    """Find ``<folder>/<id>`` or ``<folder>/<id>.<ext>`` for every id; report every missing one."""
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist")
    index = index_images(folder)
    if not index:
        raise DataError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    paths, missing = [], []
    for image_id in ids.astype(str):
        path = index.get(image_id)
        if path is None:
            missing.append(image_id)
        paths.append(path)
    if missing:
        raise DataError(f"{len(missing)} {what} id(s) have no image in {folder}: {missing[:10]}"
                        + (" ..." if len(missing) > 10 else ""))
    return paths


def read_competition(cfg: Config) -> Competition:
    """Read and check the competition folder of the config; every problem names its file."""
    folder = competition_dir(cfg)
    readers = {"csv": _read_csv_layout, "subfolders": _read_subfolder_layout, "mask": _read_mask_layout}
    competition = readers[cfg.data.layout if cfg.data.source == "folder" else "csv"](cfg, folder)
    overlap = set(competition.train["id"].astype(str)) & set(competition.test["id"].astype(str))
    if overlap:
        raise DataError(f"train and test share id(s) {sorted(overlap)[:10]}: ids must be unique across both")
    if cfg.data.max_train and cfg.data.max_train < len(competition.train):
        competition.train = subsample(competition.train, cfg.data.max_train, cfg.data.max_train_seed)
    return competition


def subsample(train: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """A seeded stratified subsample that keeps at least one image of every class."""
    rng = np.random.default_rng(seed)
    fraction = size / len(train)
    kept = []
    for _, group in train.groupby("target", sort=True):
        count = max(1, int(round(len(group) * fraction)))
        kept.append(group.iloc[np.sort(rng.choice(len(group), size=min(count, len(group)), replace=False))])
    return pd.concat(kept).sort_index().reset_index(drop=True)


def _heads_and_aux(cfg: Config, train: pd.DataFrame, path: Path) -> tuple[dict, dict]:
    heads = {col: sorted_classes(train[col]) for col in cfg.data.head_cols}
    aux = {col: sorted_classes(train[col]) for col in cfg.data.aux_cols}
    for col in list(heads) + list(aux):
        if train[col].isna().any():
            rows = (np.flatnonzero(train[col].isna())[:10] + 2).tolist()
            raise DataError(f"{path} column {col!r} is empty on line(s) {rows}")
        train[col] = train[col].map(label_text)
    return heads, aux


def _finish_targets(cfg: Config, train: pd.DataFrame, path: Path, target_col: str,
                    heads: dict[str, list[str]]) -> list[str]:
    """Check the target (or compose it from the heads); return the class names."""
    if cfg.data.compose:
        try:
            values = [{h: int(float(v)) for h, v in zip(cfg.data.head_cols, row)}
                      for row in train[cfg.data.head_cols].itertuples(index=False)]
        except ValueError:
            raise DataError(f"{path}: head columns {cfg.data.head_cols} must hold integers for data.compose") from None
        train["target"] = [str(eval_formula(cfg.data.compose, v)) for v in values]
        return composed_classes(cfg, heads)
    if train["target"].isna().any():
        rows = (np.flatnonzero(train["target"].isna())[:10] + 2).tolist()
        raise DataError(f"{path} has empty labels in column {target_col!r} on line(s) {rows}")
    train["target"] = train["target"].map(label_text)
    return sorted_classes(train["target"])


def composed_classes(cfg: Config, heads: dict[str, list[str]]) -> list[str]:
    """Every class the compose formula can produce, from the heads' integer classes."""
    import itertools

    combos = itertools.product(*[[int(float(c)) for c in heads[h]] for h in cfg.data.head_cols])
    return sorted_classes({eval_formula(cfg.data.compose, dict(zip(cfg.data.head_cols, c))) for c in combos})


def _read_solution(folder: Path, cfg: Config) -> pd.DataFrame | None:
    path = folder / cfg.data.solution
    return _read_csv(path, "solution file") if path.exists() else None


def _read_csv_layout(cfg: Config, folder: Path) -> Competition:
    sample_path = folder / cfg.data.sample_submission
    sample = _read_csv(sample_path, "sample submission")
    if len(sample.columns) < 2 and not (cfg.data.id_col and cfg.data.target_col):
        raise DataError(f"{sample_path} needs an id column and a target column; it has {list(sample.columns)}")
    id_col = cfg.data.id_col or sample.columns[0]
    target_col = cfg.data.target_col or sample.columns[1]
    train_path = folder / cfg.data.train_csv
    train_csv = _read_csv(train_path, "train CSV")
    label_cols = [] if cfg.data.compose else [target_col]
    needed = [id_col, *label_cols, *cfg.data.head_cols, *cfg.data.aux_cols]
    for optional in (cfg.data.group_col, cfg.data.path_col):
        if optional:
            needed.append(optional)
    _require_columns(train_csv, needed, train_path,
                     ["data.id_col", "data.target_col", "data.group_col", "data.path_col", "data.head_cols"])
    _require_columns(sample, [id_col], sample_path, ["data.id_col"])
    _check_ids(train_csv[id_col], train_path)
    _check_ids(sample[id_col], sample_path)
    train = pd.DataFrame({"id": train_csv[id_col].map(label_text)})
    if cfg.data.path_col:
        paths = [folder / cfg.data.train_images / str(p) for p in train_csv[cfg.data.path_col]]
        missing = [str(i) for i, p in zip(train["id"], paths) if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} training image(s) named by {cfg.data.path_col!r} do not exist, "
                            f"ids {missing[:10]}")
        train["path"] = paths
    else:
        train["path"] = _locate(train["id"], folder / cfg.data.train_images, "training")
    if not cfg.data.compose:
        train["target"] = train_csv[target_col].values
    if cfg.data.group_col:
        if train_csv[cfg.data.group_col].isna().any():
            raise DataError(f"{train_path} column {cfg.data.group_col!r} (data.group_col) has empty values")
        train["group"] = train_csv[cfg.data.group_col].map(label_text).values
    for col in [*cfg.data.head_cols, *cfg.data.aux_cols]:
        train[col] = train_csv[col].values
    heads, aux = _heads_and_aux(cfg, train, train_path)
    class_names = _finish_targets(cfg, train, train_path, target_col, heads)
    test = pd.DataFrame({"id": sample[id_col].map(label_text)})
    test["path"] = _locate(test["id"], folder / cfg.data.test_images, "test")
    return Competition(train=train, test=test, class_names=class_names, id_col=id_col, target_col=target_col,
                       sample_submission=sample, solution=_read_solution(folder, cfg), heads=heads, aux=aux,
                       compose=cfg.data.compose)


def _read_subfolder_layout(cfg: Config, folder: Path) -> Competition:
    """train/<class>/<image>, test/<image>; ids are file stems; a sample submission is optional."""
    train_dir = folder / cfg.data.train_images
    if not train_dir.is_dir():
        raise DataError(f"training folder {train_dir} does not exist")
    rows = []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append({"id": path.stem, "path": path, "target": class_dir.name})
    if not rows:
        raise DataError(f"training folder {train_dir} holds no class subfolders with images")
    train = pd.DataFrame(rows)
    _check_ids(train["id"], train_dir)
    sample_path = folder / cfg.data.sample_submission
    test_dir = folder / cfg.data.test_images
    if sample_path.exists():
        sample = _read_csv(sample_path, "sample submission")
    else:
        stems = sorted(p.stem for p in test_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) \
            if test_dir.is_dir() else []
        if not stems:
            raise DataError(f"test folder {test_dir} holds no images")
        sample = pd.DataFrame({"id": stems, "label": sorted_classes(train["target"])[0]})
    id_col = cfg.data.id_col or sample.columns[0]
    target_col = cfg.data.target_col or sample.columns[1]
    _check_ids(sample[id_col], sample_path)
    test = pd.DataFrame({"id": sample[id_col].map(label_text)})
    test["path"] = _locate(test["id"], test_dir, "test")
    class_names = sorted_classes(train["target"])
    return Competition(train=train, test=test, class_names=class_names, id_col=id_col, target_col=target_col,
                       sample_submission=sample, solution=_read_solution(folder, cfg))


MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}


def mask_age_class(age: int) -> int:
    return 0 if age < 30 else (1 if age < 60 else 2)


def _read_mask_layout(cfg: Config, folder: Path) -> Competition:
    """The Boostcamp mask competition: train/train.csv + train/images/<person>/*, eval/info.csv + eval/images.

    Each image becomes a row with heads mask (wear/incorrect/not wear), gender
    (male/female), age (<30, 30-59, >=60); the person's folder is the group, so one person's
    photos never straddle train and validation; the class is mask*6 + gender*3 + age.
    """
    people_path = folder / "train" / "train.csv"
    people = _read_csv(people_path, "mask train CSV")
    _require_columns(people, ["id", "gender", "age", "path"], people_path, ["the mask layout"])
    image_dir = folder / "train" / "images"
    rows, missing = [], []
    for person in people.itertuples():
        person_dir = image_dir / str(person.path)
        found = {p.stem: p for p in person_dir.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS} \
            if person_dir.is_dir() else {}
        for stem, mask in MASK_FILES.items():
            if stem not in found:
                missing.append(f"{person.path}/{stem}")
                continue
            gender = 0 if str(person.gender).lower() == "male" else 1
            age = mask_age_class(int(person.age))
            rows.append({"id": f"{person.path}/{stem}", "path": found[stem], "group": str(person.path),
                         "mask": str(mask), "gender": str(gender), "age": str(age),
                         "target": str(mask * 6 + gender * 3 + age)})
    if missing:
        raise DataError(f"{len(missing)} mask image(s) missing under {image_dir}: {missing[:10]}")
    train = pd.DataFrame(rows)
    info_path = folder / "eval" / "info.csv"
    sample = _read_csv(info_path, "mask eval info")
    _require_columns(sample, ["ImageID", "ans"], info_path, ["the mask layout"])
    _check_ids(sample["ImageID"], info_path)
    test = pd.DataFrame({"id": sample["ImageID"].astype(str)})
    test["path"] = _locate(test["id"], folder / "eval" / "images", "test")
    heads = {"mask": ["0", "1", "2"], "gender": ["0", "1"], "age": ["0", "1", "2"]}
    return Competition(train=train, test=test, class_names=[str(i) for i in range(18)], id_col="ImageID",
                       target_col="ans", sample_submission=sample, solution=_read_solution(folder, cfg),
                       heads=heads, compose="mask*6 + gender*3 + age")


def encode_labels(values, class_names: list[str], what: str) -> np.ndarray:
    """Class names -> indices; an unknown label is an error naming it."""
    lookup = {name: index for index, name in enumerate(class_names)}
    values = [label_text(v) for v in values]
    unknown = sorted({v for v in values if v not in lookup})
    if unknown:
        raise DataError(f"{what} has label(s) {unknown[:10]} that are not among the classes {class_names}")
    return np.array([lookup[v] for v in values], dtype=np.int64)
