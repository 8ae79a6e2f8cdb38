"""LabelMap: the two layouts, lookups, plain-type round trip and differences, with values."""

import json

import pytest

from pvt_detr.label_map import COCO_CATEGORIES, LabelMap

CATEGORIES = [{"id": 7, "name": "b"}, {"id": 1, "name": "a"}, {"id": 3, "name": "c"}]  # file order


def test_detr_layout_rows_are_category_ids():
    lm = LabelMap.from_coco_categories(CATEGORIES)
    assert lm.num_classes == 8 and lm.layout == "detr"
    assert lm.rows == ((0, None), (1, "a"), (2, None), (3, "c"), (4, None), (5, None), (6, None), (7, "b"))
    assert lm.category_ids == list(range(8))
    assert lm.names == {1: "a", 3: "c", 7: "b"}
    assert lm.row_of(7) == 7 and lm.rows_by_id == {1: 1, 3: 3, 7: 7}
    with pytest.raises(KeyError, match="category id 2 is not in this label map"):
        lm.row_of(2)  # a row, but no category


def test_compact_layout_keeps_file_order():
    lm = LabelMap.from_coco_categories(CATEGORIES, layout="compact")
    assert lm.num_classes == 3 and lm.layout == "compact"
    assert lm.category_ids == [7, 1, 3] and lm.categories == [(7, "b"), (1, "a"), (3, "c")]
    assert [lm.row_of(i) for i in (7, 1, 3)] == [0, 1, 2]
    assert lm.names == {7: "b", 1: "a", 3: "c"}
    with pytest.raises(ValueError, match="layout must be"):
        LabelMap.from_coco_categories(CATEGORIES, layout="mmdet")


def test_coco():
    assert len(COCO_CATEGORIES) == 80 and COCO_CATEGORIES[11] == (13, "stop sign") and COCO_CATEGORIES[-1] == (
        90, "toothbrush")
    detr, compact = LabelMap.coco(), LabelMap.coco("compact")
    assert detr.num_classes == 91 and compact.num_classes == 80
    assert detr.row_of(90) == 90 and compact.row_of(90) == 79 and compact.row_of(13) == 11
    assert detr.rows[12] == (12, None) and detr.names == compact.names == dict(COCO_CATEGORIES)
    assert detr != compact and detr == LabelMap.coco("detr")


def test_plain_type_round_trip():
    for lm in (LabelMap.coco(), LabelMap.from_coco_categories(CATEGORIES, "compact")):
        items = lm.to_list()
        assert json.loads(json.dumps(items)) == items
        assert LabelMap.from_list(items) == lm
    assert LabelMap.from_coco_categories(CATEGORIES, "compact").to_list() == [[7, "b"], [1, "a"], [3, "c"]]
    assert LabelMap.from_coco_categories(CATEGORIES).to_list()[:2] == [[0, None], [1, "a"]]


def test_invalid_maps_are_errors():
    with pytest.raises(ValueError, match="distinct category ids"):
        LabelMap(((1, "a"), (1, "b")))
    with pytest.raises(ValueError, match="distinct category ids"):
        LabelMap(((-1, "a"),))
    with pytest.raises(ValueError, match="repeated category ids"):
        LabelMap.from_coco_categories([{"id": 2, "name": "a"}, {"id": 2, "name": "b"}])
    with pytest.raises(ValueError, match="at least one named category"):
        LabelMap(((0, None),))


def test_diff_says_what_changed():
    lm = LabelMap.from_coco_categories(CATEGORIES)
    assert str(lm.diff(LabelMap.from_coco_categories(CATEGORIES))) == "same ids and names"
    layout = lm.diff(LabelMap.from_coco_categories(CATEGORIES, "compact"))
    assert not layout.same_rows and layout.same_categories and str(layout) == "same ids and names in another row layout"

    moved = lm.diff(LabelMap.from_coco_categories([{"id": 1, "name": "a"}, {"id": 2, "name": "c"},
                                                   {"id": 7, "name": "b"}]))
    assert moved.moved == [("c", 3, 2)] and moved.same_names and not moved.same_categories
    assert moved.only_self == [(3, "c")] and moved.only_other == [(2, "c")]
    assert str(moved) == "same names under other ids (1 moved, e.g. 'c': id 3 -> 2)"

    other = lm.diff(LabelMap.from_coco_categories([{"id": 1, "name": "a"}, {"id": 3, "name": "dog"},
                                                   {"id": 9, "name": "e"}]))
    assert other.renamed == [(3, "c", "dog")] and other.only_self == [(7, "b")] and other.only_other == [(9, "e")]
    assert str(other) == ("a different set: 1 ids renamed (e.g. id 3: 'c' -> 'dog'); 1 categories only here "
                          "(e.g. (7, 'b')); 1 only in the other (e.g. (9, 'e'))")
    coco = LabelMap.coco().diff(LabelMap.from_coco_categories([{"id": 1, "name": "person"}]))
    assert len(coco.only_self) == 79 and not coco.only_other and not coco.renamed
