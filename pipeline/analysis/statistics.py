"""EDA's numbers: class balance, groups, image sizes, intensities and duplicates. Pure functions
over tables and (memory-mapped) image arrays; the cache is read in one streaming pass, so memory
does not grow with the competition."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

NEAR_THRESHOLD = 4  # bits of 64: on photos, a dHash this close is the same picture re-encoded, resized, re-lit
CHUNK_BYTES = 16 * 2**20  # cache bytes per step of the streaming pass
SAMPLES_PER_CLASS = 8
EXAMPLES = 10  # pairs listed per kind of duplicate


# ---------------------------------------------------------------- labels and groups

def class_balance(targets, class_names: list[str]) -> pd.DataFrame:
    """Images per class: index ``class`` (in ``class_names`` order, absent classes as 0), columns count, share."""
    counts = pd.Series(np.asarray(targets).astype(str)).value_counts().reindex(class_names, fill_value=0)
    table = pd.DataFrame({"count": counts.astype(int), "share": counts / max(counts.sum(), 1)})
    table.index.name = "class"
    return table


def group_table(train: pd.DataFrame) -> pd.DataFrame:
    """Per group (index): number of images and of distinct classes."""
    return train.groupby("group").agg(images=("id", "size"), classes=("target", "nunique"))


def group_summary(groups: pd.DataFrame) -> dict:
    """The numbers of ``group_table``: group count, images per group, groups per number of classes."""
    images = groups["images"]
    return {"n_groups": len(groups),
            "images_per_group": {"min": int(images.min()), "median": float(images.median()),
                                 "mean": float(images.mean()), "max": int(images.max())},
            "groups_by_class_count": {int(k): int(v) for k, v in groups["classes"].value_counts().sort_index().items()}}


def label_crosstab(train: pd.DataFrame, column: str, class_names: list[str]) -> pd.DataFrame:
    """Images per class (rows, in ``class_names`` order) and value of ``column`` (columns)."""
    table = pd.crosstab(train["target"].astype(str), train[column].astype(str))
    return table.reindex(class_names, fill_value=0).rename_axis(index="class", columns=column)


# ---------------------------------------------------------------- original image sizes

def read_sizes(paths, desc: str) -> pd.DataFrame:
    """Width and height of each image from its header alone (no decoding); NaN where a file cannot be read."""
    rows = []
    for path in tqdm(list(paths), desc=desc, unit="img", file=sys.stderr, mininterval=1.0, disable=None):
        try:
            with Image.open(path) as image:  # open() parses the header; pixels are decoded only on load()
                rows.append(image.size)
        except (OSError, SyntaxError, ValueError):
            rows.append((np.nan, np.nan))
    sizes = pd.DataFrame(rows, columns=["width", "height"], dtype=float)
    sizes["aspect"] = sizes["width"] / sizes["height"]
    return sizes


def size_summary(sizes: pd.DataFrame, top: int = 10) -> dict:
    """Range and median of width, height, aspect (width/height); the ``top`` most common sizes with their share."""
    readable = sizes.dropna()
    summary: dict = {"images": len(sizes), "unreadable": len(sizes) - len(readable)}
    if readable.empty:
        return summary
    for column in ("width", "height", "aspect"):
        values = readable[column]
        summary[column] = {"min": float(values.min()), "median": float(values.median()), "max": float(values.max())}
    labels = readable["width"].astype(int).astype(str) + "x" + readable["height"].astype(int).astype(str)
    counts = labels.value_counts()
    summary["distinct_sizes"] = len(counts)
    summary["most_common"] = [{"size": size, "count": int(count), "share": count / len(readable)}
                              for size, count in counts.head(top).items()]
    return summary


def ks_distance(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of ``a`` and ``b``."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    points = np.concatenate([a, b])
    gaps = np.searchsorted(a, points, side="right") / len(a) - np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(gaps).max())


def compare_sizes(train: pd.DataFrame, test: pd.DataFrame, limit: float = 0.1) -> dict:
    """KS distance between train and test widths, heights, aspects; ``differ`` when one exceeds ``limit``.

    The distance rather than a p-value: with thousands of images any difference is
    significant, while a distance of 0.1 (a tenth of the images shifted) is one worth a look.
    """
    train, test = train.dropna(), test.dropna()
    if train.empty or test.empty:
        return {"ks": {}, "differ": False}
    ks = {column: ks_distance(train[column], test[column]) for column in ("width", "height", "aspect")}
    return {"ks": ks, "differ": max(ks.values()) > limit}


# ---------------------------------------------------------------- pixels: one streaming pass

def grid_sums(images, rows: int = 8, columns: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Pixel sums of each image of an N x H x W x C uint8 batch over a ``rows`` x ``columns`` grid of near-equal cells.

    Returns (N x rows x columns x C int64 sums, rows x columns pixel counts of the cells).
    An image smaller than the grid is first enlarged by repeating pixels, so no cell is empty.
    """
    images = np.asarray(images)
    if images.shape[1] < rows:
        images = np.repeat(images, -(-rows // images.shape[1]), axis=1)
    if images.shape[2] < columns:
        images = np.repeat(images, -(-columns // images.shape[2]), axis=2)
    height, width = images.shape[1:3]
    row_edges, column_edges = (np.arange(rows) * height) // rows, (np.arange(columns) * width) // columns
    # Integer sums are exact (a hash must not depend on summation order) and, done on the
    # uint8 array in place of a float copy, several times faster.
    cells = np.add.reduceat(np.add.reduceat(images, row_edges, axis=1, dtype=np.uint32),
                            column_edges, axis=2, dtype=np.uint32)
    areas = np.outer(np.diff(row_edges, append=height), np.diff(column_edges, append=width))
    return cells.astype(np.int64), areas


def hash_cells(cells: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """dHash bits from N x 8 x 9 x C ``grid_sums``: 1 where a cell is brighter than its left neighbour; uint64."""
    brightness = cells.sum(axis=-1) / areas  # channel sum: C times the grey level, the same factor in every cell
    bits = (brightness[:, :, 1:] > brightness[:, :, :-1]).reshape(len(cells), -1)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def difference_hash(images) -> np.ndarray:
    """64-bit perceptual dHash of each image of an N x H x W (x C) uint8 batch, as uint64.

    Grey (channel mean), area-averaged down to 8 rows x 9 columns, one bit per horizontal
    neighbour pair: 1 where the right cell is brighter. A change of brightness or contrast,
    re-compression or resizing keeps almost every bit; a different picture flips about half.
    """
    images = np.asarray(images)
    return hash_cells(*grid_sums(images[..., None] if images.ndim == 3 else images))


def scan_images(images, desc: str) -> dict:
    """One pass over an N x H x W x C uint8 array (memory-mapped is fine), in chunks.

    Returns ``histogram`` (C x 256 pixel counts), ``sums`` (N x C pixel sums per image),
    ``digests`` (N hex digests of the bytes: equal only for identical images) and
    ``hashes`` (N dHashes).
    """
    count, channels = len(images), images.shape[-1]
    pixels = int(np.prod(images.shape[1:3]))
    step = max(1, CHUNK_BYTES // max(pixels * channels, 1))
    histogram = np.zeros((channels, 256), dtype=np.int64)
    sums = np.zeros((count, channels), dtype=np.int64)
    digests, hashes = [], np.zeros(count, dtype=np.uint64)
    with tqdm(total=count, desc=desc, unit="img", file=sys.stderr, mininterval=1.0, disable=None) as progress:
        for start in range(0, count, step):
            chunk = np.ascontiguousarray(images[start:start + step])
            stop = start + len(chunk)
            for channel in range(channels):
                histogram[channel] += np.bincount(chunk[..., channel].ravel(), minlength=256)
            cells, areas = grid_sums(chunk)
            # The cells tile the image (enlarged by whole repeats when tiny): their total is its sum times the repeat.
            sums[start:stop] = cells.sum(axis=(1, 2)) * pixels // areas.sum()
            hashes[start:stop] = hash_cells(cells, areas)
            digests += [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in chunk]
            progress.update(len(chunk))
    return {"histogram": histogram, "sums": sums, "digests": np.array(digests, dtype=object), "hashes": hashes}


def channel_stats(histogram: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of all pixels counted in a C x 256 histogram.

    The same formula as prepare's (exact integer sums, std from E[x^2] - E[x]^2), so the
    result equals the cache's meta.json to rounding.
    """
    values = np.arange(256, dtype=np.int64)
    pixels = histogram.sum(axis=1)
    mean = (histogram @ values) / pixels
    std = np.sqrt(np.maximum((histogram @ values**2) / pixels - mean**2, 1e-12))
    return (mean / 255.0).tolist(), (std / 255.0).tolist()


def class_intensity(sums: np.ndarray, targets, class_names: list[str], pixels_per_image: int) -> pd.DataFrame:
    """Per class: images, mean intensity in [0, 1] (all channels; per channel when several), std of image means."""
    image_means = sums / (pixels_per_image * 255.0)
    frame = pd.DataFrame(image_means, columns=[f"mean_c{c}" for c in range(sums.shape[1])])
    frame["image_mean"] = image_means.mean(axis=1)
    frame["class"] = np.asarray(targets).astype(str)
    grouped = frame.groupby("class")
    table = pd.DataFrame({"images": grouped.size(), "mean": grouped["image_mean"].mean(),
                          "image_mean_std": grouped["image_mean"].std(ddof=0)})
    if sums.shape[1] > 1:
        table = table.join(grouped[[f"mean_c{c}" for c in range(sums.shape[1])]].mean())
    return table.reindex(class_names).rename_axis("class")


# ---------------------------------------------------------------- duplicates

def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(values)
    as_bytes = np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8).reshape(*np.shape(values), 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def hamming_pairs(hashes, other=None, threshold: int = NEAR_THRESHOLD,
                  max_pairs: int = 100_000) -> tuple[pd.DataFrame, int]:
    """Pairs of 64-bit hashes at most ``threshold`` bits apart.

    ``other`` None: pairs inside ``hashes`` (a < b); else ``hashes[a]`` against ``other[b]``.
    Distances are computed in blocks of rows against all columns (vectorised, bounded
    memory: 20k x 20k hashes take seconds). Returns (a, b, distance sorted by distance, a,
    b; at most ``max_pairs`` rows) and the total number of pairs found.
    """
    rows = np.asarray(hashes, dtype=np.uint64)
    columns = rows if other is None else np.asarray(other, dtype=np.uint64)
    block = max(1, 4_000_000 // max(len(columns), 1))
    found, total = [], 0
    for start in range(0, len(rows), block):
        # Inside one set, a row needs only the columns after it.
        offset = start if other is None else 0
        distance = popcount(rows[start:start + block, None] ^ columns[None, offset:])
        hit = distance <= threshold
        if other is None:
            hit &= np.arange(start, start + len(distance))[:, None] < np.arange(offset, len(columns))[None, :]
        a, b = np.nonzero(hit)
        total += len(a)
        kept = sum(len(f) for f in found)
        if kept < max_pairs:
            a, b = a[:max_pairs - kept], b[:max_pairs - kept]
            found.append(pd.DataFrame({"a": a + start, "b": b + offset, "distance": distance[a, b].astype(int)}))
    empty = pd.DataFrame({"a": [], "b": [], "distance": []}, dtype=int)
    pairs = pd.concat(found, ignore_index=True) if found else empty
    return pairs.sort_values(["distance", "a", "b"], ignore_index=True), total


def random_pair_distances(hashes, samples: int = 100_000, seed: int = 0) -> dict:
    """Quantiles of the hash distance between random pairs of images: a yardstick for the threshold.

    On a competition whose images all share one layout (solar cells, X-rays, documents) the
    dHashes of unrelated images lie closer than on photos, and the near pairs may be just
    the low tail of this distribution rather than copies.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    count = len(hashes)
    if count < 2:
        return {"sampled_pairs": 0}
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, count, samples), rng.integers(0, count - 1, samples)
    b += b >= a  # a uniform partner other than a itself
    distance = popcount(hashes[a] ^ hashes[b])
    return {"sampled_pairs": samples, "quantiles": {q: float(np.quantile(distance, q)) for q in (0.001, 0.01, 0.5)}}


def exact_groups(digests) -> list[np.ndarray]:
    """Row indices of each set of 2+ equal digests, ordered by first row."""
    indices = pd.Series(np.asarray(digests)).groupby(np.asarray(digests), sort=False).indices
    return sorted((np.sort(rows) for rows in indices.values() if len(rows) > 1), key=lambda rows: rows[0])


def find_duplicates(train: pd.DataFrame, test: pd.DataFrame, threshold: int = NEAR_THRESHOLD) -> dict:
    """Exact and near duplicates inside train and between train and test.

    ``train``: columns id, target, digest, hash; ``test``: id, digest, hash (one row per
    image, row order = position). Returns four pair tables (row_a, row_b, id_a, id_b,
    distance; label_a, label_b for train pairs), train always on the ``a`` side:
    ``exact_train`` (each extra member of an identical set paired with its first member),
    ``near_train`` (between images that are not identical, one per identical set),
    ``exact_leak`` (a test image identical to a train image) and ``near_leak`` (a test
    image not identical to any train image but near one); plus the uncapped counts of
    near pairs in ``near_totals`` and ``random_pairs`` (``random_pair_distances`` of train).
    """
    def table(a_frame, a_rows, b_frame, b_rows, distance):
        a_rows, b_rows = np.asarray(a_rows, dtype=int), np.asarray(b_rows, dtype=int)
        frame = pd.DataFrame({"row_a": a_rows, "row_b": b_rows, "id_a": a_frame["id"].to_numpy()[a_rows],
                              "id_b": b_frame["id"].to_numpy()[b_rows], "distance": np.asarray(distance, dtype=int)})
        frame["label_a"] = a_frame["target"].to_numpy()[a_rows]
        if "target" in b_frame:
            frame["label_b"] = b_frame["target"].to_numpy()[b_rows]
        return frame

    groups = exact_groups(train["digest"])
    first = np.concatenate([np.repeat(g[0], len(g) - 1) for g in groups]) if groups else []
    others = np.concatenate([g[1:] for g in groups]) if groups else []
    # Near duplicates among one representative per identical set: identical copies would
    # otherwise repeat every near pair once per copy.
    representatives = np.flatnonzero(~train["digest"].duplicated().to_numpy())
    representative_hashes = train["hash"].to_numpy()[representatives]
    near, near_train_total = hamming_pairs(representative_hashes, threshold=threshold)
    row_of_digest = pd.Series(representatives, index=train["digest"].to_numpy()[representatives])
    in_train = test["digest"].isin(row_of_digest.index).to_numpy()
    leaks, rest = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    near_leak, near_leak_total = hamming_pairs(representative_hashes, test["hash"].to_numpy()[rest], threshold)
    leak_sources = row_of_digest.loc[test["digest"].to_numpy()[leaks]].to_numpy()
    return {
        "exact_train": table(train, first, train, others, np.zeros(len(others))),
        "near_train": table(train, representatives[near["a"].to_numpy()], train,
                            representatives[near["b"].to_numpy()], near["distance"]),
        "exact_leak": table(train, leak_sources, test, leaks, np.zeros(len(leaks))),
        "near_leak": table(train, representatives[near_leak["a"].to_numpy()], test,
                           rest[near_leak["b"].to_numpy()], near_leak["distance"]),
        "near_totals": {"near_train": near_train_total, "near_leak": near_leak_total},
        "random_pairs": random_pair_distances(representative_hashes),
    }


def pixel_difference(images_a, rows_a, images_b, rows_b) -> np.ndarray:
    """Mean absolute difference in [0, 1] between ``images_a[rows_a[k]]`` and ``images_b[rows_b[k]]``, per pair.

    A second opinion on a hash match: a copy, even re-encoded, stays near 0, while two
    different images that merely share a layout (and so a dHash) differ visibly.
    """
    return np.array([np.abs(np.asarray(images_a[a], dtype=np.float32) - np.asarray(images_b[b], dtype=np.float32))
                     .mean() / 255.0 for a, b in zip(rows_a, rows_b)], dtype=np.float64)


def add_pixel_differences(duplicates: dict, train_images, test_images, listed: int = EXAMPLES) -> None:
    """Add ``pixel_difference`` to the first ``listed`` pairs of each table (NaN beyond: cheap at any scale)."""
    for kind in ("exact_train", "near_train", "exact_leak", "near_leak"):
        table, head = duplicates[kind], duplicates[kind].head(listed)
        table["pixel_difference"] = np.nan
        table.loc[head.index, "pixel_difference"] = pixel_difference(
            train_images, head["row_a"], test_images if "leak" in kind else train_images, head["row_b"])


def duplicate_summary(duplicates: dict, threshold: int, examples: int = EXAMPLES) -> dict:
    """The counts and first examples (by id) of ``find_duplicates``' tables, for eda.json."""
    def pairs(frame):
        frame = frame.head(examples)
        listed = []
        for row in frame.to_dict(orient="records"):
            pair = {"a": row["id_a"], "b": row["id_b"], "distance": int(row["distance"])}
            if "pixel_difference" in row:
                pair["pixel_difference"] = round(float(row["pixel_difference"]), 4)
            if "label_b" in row:
                pair["labels"] = [row["label_a"], row["label_b"]]
            else:
                pair["train_label"] = row["label_a"]
            listed.append(pair)
        return listed

    exact = duplicates["exact_train"]
    sets = [{"ids": [group["id_a"].iloc[0], *group["id_b"]], "labels": [group["label_a"].iloc[0], *group["label_b"]]}
            for _, group in exact.groupby("row_a", sort=True)]
    near, exact_leak, near_leak = duplicates["near_train"], duplicates["exact_leak"], duplicates["near_leak"]
    totals = duplicates["near_totals"]
    return {
        "threshold": threshold,
        "random_pairs": duplicates["random_pairs"],
        "exact_train": {"sets": len(sets), "images": len(exact) + len(sets), "redundant_images": len(exact),
                        "label_conflicts": sum(len(set(s["labels"])) > 1 for s in sets), "examples": sets[:examples]},
        "near_train": {"pairs": totals["near_train"], "pairs_listed": len(near),
                       "label_disagreements": int((near["label_a"] != near["label_b"]).sum()), "examples": pairs(near)},
        "exact_leak": {"test_images": len(exact_leak), "examples": pairs(exact_leak)},
        "near_leak": {"pairs": totals["near_leak"], "test_images": int(near_leak["row_b"].nunique()),
                      "examples": pairs(near_leak)},
    }


# ---------------------------------------------------------------- figures
