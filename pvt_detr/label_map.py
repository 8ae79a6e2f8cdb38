"""`LabelMap`: which dataset category each class output row of a detector stands for.

Two layouts exist. facebookresearch/detr's: row r is category id r, so a head has `max id + 1` rows (91 for COCO,
ids 1-90) and rows whose id is no category (COCO's 0, 12, 26, ...) stand for nothing (name None). Compact
(MMDetection, torchvision's label lists): row i is the i-th category of the annotation file (COCO: 80 rows).
Either way the no-object row of a DETR head is not part of the map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# COCO 2017 detection categories (id, name) in annotation-file order; MMDetection 2.x's `CocoDataset.CLASSES` lists
# the same names in the same order (its label i = the i-th of them).
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"),
    (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"),
    (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"),
    (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"),
    (90, "toothbrush"),
)

Layout = Literal["detr", "compact"]


@dataclass(frozen=True)
class LabelMap:
    """rows[r] = (category_id, name) that class output row r stands for; name None = no category (a DETR-layout
    row whose id is not in the dataset). Equal maps give every row the same meaning."""

    rows: tuple[tuple[int, str | None], ...]

    def __post_init__(self):
        rows = tuple((int(i), None if n is None else str(n)) for i, n in self.rows)
        object.__setattr__(self, "rows", rows)
        ids = [i for i, _ in rows]
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"a label map needs distinct category ids >= 0, got {ids}")
        if not any(n is not None for _, n in rows):
            raise ValueError("a label map needs at least one named category")

    @classmethod
    def from_coco_categories(cls, categories: list[dict], layout: Layout = "detr") -> LabelMap:
        """From an annotation file's `categories` ([{"id": 1, "name": "person"}, ...], in file order).

        layout "detr": max id + 1 rows, row r = id r; "compact": one row per category, in file order.
        """
        pairs = [(int(c["id"]), str(c["name"])) for c in categories]
        if layout == "compact":
            return cls(tuple(pairs))
        if layout != "detr":
            raise ValueError(f"layout must be 'detr' or 'compact', got {layout!r}")
        names = dict(pairs)
        if len(names) != len(pairs):
            raise ValueError(f"repeated category ids in {[i for i, _ in pairs]}")
        if not names or min(names) < 0:
            raise ValueError(f"a label map needs category ids >= 0, got {sorted(names)}")
        return cls(tuple((r, names.get(r)) for r in range(max(names) + 1)))

    @classmethod
    def coco(cls, layout: Layout = "detr") -> LabelMap:
        """COCO's 80 categories: 91 rows (ids 0-90) in DETR's layout, 80 in the compact (MMDetection) one."""
        return cls.from_coco_categories([{"id": i, "name": n} for i, n in COCO_CATEGORIES], layout)

    @property
    def num_classes(self) -> int:
        """Class output rows (no-object excluded)."""
        return len(self.rows)

    @property
    def layout(self) -> Layout:
        """'detr' if every row r stands for id r, else 'compact'."""
        return "detr" if all(i == r for r, (i, _) in enumerate(self.rows)) else "compact"

    @property
    def category_ids(self) -> list[int]:
        """Row -> category id, for every row (index it with predicted labels to get dataset ids)."""
        return [i for i, _ in self.rows]

    @property
    def categories(self) -> list[tuple[int, str]]:
        """The named (category_id, name) pairs in row order."""
        return [(i, n) for i, n in self.rows if n is not None]

    @property
    def names(self) -> dict[int, str]:
        """Category id -> name, named categories only."""
        return dict(self.categories)

    @property
    def rows_by_id(self) -> dict[int, int]:
        """Category id -> its row, named categories only."""
        return {i: r for r, (i, n) in enumerate(self.rows) if n is not None}

    def row_of(self, category_id: int) -> int:
        """The row that stands for `category_id`; KeyError if it is not one of the map's categories."""
        rows = self.rows_by_id
        if category_id not in rows:
            raise KeyError(f"category id {category_id} is not in this label map")
        return rows[category_id]

    def to_list(self) -> list[list]:
        """Plain types for a checkpoint or JSON: [[category_id, name or None], ...], one per row."""
        return [[i, n] for i, n in self.rows]

    @classmethod
    def from_list(cls, items: list) -> LabelMap:
        """Inverse of `to_list`."""
        return cls(tuple((i, n) for i, n in items))

    def diff(self, other: LabelMap) -> LabelMapDiff:
        """How `other`'s categories differ from these (for fine-tuning from one dataset's model to another)."""
        mine, theirs = self.names, other.names
        by_name_mine = {n: i for i, n in mine.items()}
        by_name_theirs = {n: i for i, n in theirs.items()}
        return LabelMapDiff(
            same_rows=self.rows == other.rows,
            same_names=sorted(mine.values()) == sorted(theirs.values()),
            only_self=sorted((i, n) for i, n in mine.items() if i not in theirs),
            only_other=sorted((i, n) for i, n in theirs.items() if i not in mine),
            renamed=sorted((i, mine[i], theirs[i]) for i in mine.keys() & theirs.keys() if mine[i] != theirs[i]),
            moved=sorted((n, by_name_mine[n], by_name_theirs[n]) for n in by_name_mine.keys() & by_name_theirs.keys()
                         if by_name_mine[n] != by_name_theirs[n]),
        )


@dataclass(frozen=True)
class LabelMapDiff:
    """What `LabelMap.diff` found. same_names: the same names (maybe under other ids); only_*: (id, name) of ids one
    side lacks; renamed: (id, name here, name there); moved: (name, id here, id there), a name under another id."""

    same_rows: bool
    same_names: bool
    only_self: list[tuple[int, str]]
    only_other: list[tuple[int, str]]
    renamed: list[tuple[int, str, str]]
    moved: list[tuple[str, int, int]]

    @property
    def same_categories(self) -> bool:
        """Same ids with the same names (rows may still be laid out differently)."""
        return not (self.only_self or self.only_other or self.renamed)

    def __str__(self) -> str:
        """One line."""
        if self.same_rows:
            return "same ids and names"
        if self.same_categories:
            return "same ids and names in another row layout"
        if self.same_names and self.moved:
            name, a, b = self.moved[0]
            return f"same names under other ids ({len(self.moved)} moved, e.g. {name!r}: id {a} -> {b})"
        parts = []
        if self.moved:
            parts.append(f"{len(self.moved)} names under other ids (e.g. {self.moved[0][0]!r}: "
                         f"id {self.moved[0][1]} -> {self.moved[0][2]})")
        if self.renamed:
            i, a, b = self.renamed[0]
            parts.append(f"{len(self.renamed)} ids renamed (e.g. id {i}: {a!r} -> {b!r})")
        if self.only_self:
            parts.append(f"{len(self.only_self)} categories only here (e.g. {self.only_self[0]})")
        if self.only_other:
            parts.append(f"{len(self.only_other)} only in the other (e.g. {self.only_other[0]})")
        return "a different set: " + "; ".join(parts)
