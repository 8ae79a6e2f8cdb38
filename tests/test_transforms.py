"""Box targets through the eval transform, flip, resize, DETR's crop and padding, checked coordinate by coordinate."""

from __future__ import annotations

import pytest
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from datasets.coco import coco_target, sanitize_boxes, to_detr_target
from datasets.collate import collate_fn
from datasets.transforms import RandomSizeCrop, detr_crop_sizes, train_transform
from pvt_detr.preprocess import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, resized_size


def _image(width: int, height: int, boxes_xyxy: list[list[int]], colour=(255, 255, 255)) -> Image.Image:
    """Black image with each box filled with `colour`."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    for x0, y0, x1, y1 in boxes_xyxy:
        image.paste(colour, (x0, y0, x1, y1))
    return image


def _target(width: int, height: int, boxes_xyxy: list[list[int]], labels: list[int]) -> dict:
    annotations = [{"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": c} for (x0, y0, x1, y1), c in
                   zip(boxes_xyxy, labels)]
    return coco_target(annotations, image_id=5, height=height, width=width)


def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def test_eval_transform_image_alone_is_resized_and_normalised():
    image = Image.new("RGB", (100, 50), (255, 0, 51))
    out = build_eval_transform(test_size=100, max_size=1000)(image)
    assert tuple(out.shape) == (3, 100, 200) and out.dtype == torch.float32
    expected = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                (0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4, rtol=0)


def test_eval_transform_resizes_boxes_with_the_image():
    boxes = [[10, 5, 30, 25]]
    image, target = build_eval_transform(100, 1000)(_image(100, 50, boxes), _target(100, 50, boxes, [3]))
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[20.0, 10.0, 60.0, 50.0]]))
    detr = to_detr_target(image, target)
    torch.testing.assert_close(detr["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
    torch.testing.assert_close(detr["area"], torch.tensor([1600.0]))
    assert detr["size"].tolist() == [100, 200] and detr["orig_size"].tolist() == [50, 100]


def test_eval_transform_caps_the_long_side():
    image, target = build_eval_transform(100, 150)(_image(100, 50, []), _target(100, 50, [[0, 0, 100, 50]], [1]))
    assert tuple(image.shape) == (3, 75, 150)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[0.0, 0.0, 150.0, 75.0]]))


@pytest.mark.parametrize("h, w, short, max_size", [
    (480, 640, 800, 1333), (640, 480, 800, 1333), (427, 640, 800, 1333), (200, 1000, 800, 1333),
    (1000, 200, 800, 1333), (128, 128, 128, 1333), (97, 131, 64, 80), (50, 100, 100, 100), (90, 60, 128, 100),
])
def test_resized_size_matches_the_eval_transform(h, w, short, max_size):
    out = build_eval_transform(short, max_size)(torch.zeros(3, h, w, dtype=torch.uint8))
    assert resized_size(h, w, short, max_size) == tuple(out.shape[-2:])


@pytest.mark.parametrize("size, expected", [((20, 3000), (1, 96)), ((3000, 20), (96, 1)), ((1, 100000), (1, 96)),
                                            ((1, 1), (64, 64))])
@pytest.mark.parametrize("aug", ["eval", "pvt", "detr"])
def test_any_aspect_ratio_resizes_to_at_least_one_pixel_with_its_box(size, expected, aug):
    h, w = size
    box = [[0.0, 0.0, float(w), float(h)]]  # the whole image
    transform = build_eval_transform(64, 96) if aug == "eval" else train_transform(aug, [64], 96)
    torch.manual_seed(0)
    image, target = transform(torch.zeros(3, h, w, dtype=torch.uint8), _target(w, h, box, [1]))
    new_h, new_w = image.shape[-2:]
    assert min(new_h, new_w) >= 1 and max(new_h, new_w) <= 96
    if aug != "detr":  # no crop: DETR's resize rule exactly, the box still the whole image
        assert (new_h, new_w) == resized_size(h, w, 64, 96) == expected
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                                   torch.tensor([[0.0, 0.0, float(new_w), float(new_h)]]))


def test_evaluation_transform_draws_no_random_numbers():
    # Evaluation between epochs must not shift training's random stream (resume equals the uninterrupted run).
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    image = torch.zeros(3, 30, 50, dtype=torch.uint8)
    image, _ = build_eval_transform(64, 96)(image, _target(50, 30, [[0, 0, 5, 5]], [1]))
    assert image.shape == (3, 57, 96)  # short side 64 would make the long side 106 > 96
    torch.testing.assert_close(torch.rand(4), expected)


@pytest.mark.parametrize("flip_prob, expected_cxcywh", [(1.0, [0.8, 0.3, 0.2, 0.4]), (0.0, [0.2, 0.3, 0.2, 0.4])])
def test_train_flip_and_resize_exact_boxes(flip_prob, expected_cxcywh):
    # 100 x 50 image, box x 10..30, y 5..25; short side 50 -> 100 doubles everything.
    boxes = [[10, 5, 30, 25]]
    transform = train_transform("pvt", [100], max_size=1000, flip_prob=flip_prob)
    image, target = transform(_image(100, 50, boxes), _target(100, 50, boxes, [7]))
    detr = to_detr_target(image, target)
    torch.testing.assert_close(detr["boxes"], torch.tensor([expected_cxcywh]))
    assert detr["labels"].tolist() == [7] and detr["size"].tolist() == [100, 200]
    bright = _unnormalize(image).mean(dim=0) > 0.5  # (H, W) the white box
    cols = bright.any(dim=0).nonzero().flatten()
    expected_x0 = 140 if flip_prob else 20
    assert abs(int(cols[0]) - expected_x0) <= 1 and abs(int(cols[-1]) + 1 - (expected_x0 + 40)) <= 1


def test_random_size_crop_exact_boxes():
    # 100 x 80 image cropped to x 30..80, y 10..60: box A inside, B cut at the left edge, C outside.
    boxes = [[35, 15, 55, 35], [20, 0, 40, 30], [0, 60, 20, 80]]
    crop = RandomSizeCrop(50, 50)
    crop.make_params = lambda flat_inputs: dict(top=10, left=30, height=50, width=50)
    image, target = v2.Compose([crop, sanitize_boxes()])(_image(100, 80, boxes), _target(100, 80, boxes, [1, 3, 7]))
    assert image.size == (50, 50)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[5.0, 5.0, 25.0, 25.0], [0.0, 0.0, 10.0, 20.0]]))
    assert target["labels"].tolist() == [1, 3] and target["iscrowd"].tolist() == [0, 0]


def test_random_size_crop_params_stay_inside_the_image():
    torch.manual_seed(0)
    crop = RandomSizeCrop(30, 60)
    sizes = set()
    for _ in range(200):
        p = crop.make_params([tv_tensors.Image(torch.zeros(3, 80, 45))])
        assert 30 <= p["height"] <= 60 and 30 <= p["width"] <= 45
        assert 0 <= p["top"] <= 80 - p["height"] and 0 <= p["left"] <= 45 - p["width"]
        sizes.add((p["height"], p["width"]))
    assert len(sizes) > 50  # random, not fixed
    # an image smaller than min_size is kept whole instead of failing
    assert RandomSizeCrop(30, 60).make_params([tv_tensors.Image(torch.zeros(3, 20, 25))]) == dict(
        top=0, left=0, height=20, width=25)


def test_detr_crop_sizes_are_detr_at_800_and_proportional_below():
    assert detr_crop_sizes([480, 512, 800]) == ([400, 500, 600], (384, 600))
    assert detr_crop_sizes([96, 128]) == ([64, 80, 96], (61, 96))


def _assert_box_frames_bright_region(bright: torch.Tensor, box_xyxy: list[float]) -> None:
    """All pixels 2 px inside the box are bright; none in 2-4 px wide strips just outside its four sides."""
    height, width = bright.shape
    x0, y0, x1, y1 = (round(v) for v in box_xyxy)
    assert bright[y0 + 2:y1 - 2, x0 + 2:x1 - 2].all()
    strips = [bright[y0 + 2:y1 - 2, max(x0 - 4, 0):max(x0 - 2, 0)], bright[y0 + 2:y1 - 2, x1 + 2:x1 + 4],
              bright[max(y0 - 4, 0):max(y0 - 2, 0), x0 + 2:x1 - 2], bright[y1 + 2:y1 + 4, x0 + 2:x1 - 2]]
    assert not any(strip.any() for strip in strips)


@pytest.mark.parametrize("aug", ["pvt", "detr"])
def test_train_boxes_follow_the_pixels_on_tiny_images(aug):
    """Whatever flip/resize/crop is drawn, each target box must frame its white rectangle in the output image."""
    boxes = [[20, 30, 70, 90], [90, 10, 120, 40]]
    transform = train_transform(aug, [96, 128], max_size=1333)
    torch.manual_seed(0)
    short_sides, box_counts = set(), set()
    for _ in range(25):
        image, target = transform(_image(128, 128, boxes), _target(128, 128, boxes, [1, 3]))
        detr = to_detr_target(image, target)
        height, width = image.shape[-2:]
        short_sides.add(min(height, width))
        box_counts.add(len(detr["labels"]))
        bright = _unnormalize(image).mean(dim=0) > 0.5  # (H, W)
        boxes_xyxy = torchvision.ops.box_convert(detr["boxes"], "cxcywh", "xyxy") * torch.tensor(
            [width, height, width, height])  # (T, 4)
        for box in boxes_xyxy.tolist():
            _assert_box_frames_bright_region(bright, box)
    assert short_sides == {96, 128}
    if aug == "pvt":
        assert box_counts == {2}
    else:
        assert 1 in box_counts  # DETR's crop branch was drawn and cut a box away


def test_collate_pads_to_32_and_keeps_normalised_boxes():
    first_target = {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]]), "size": torch.tensor([50, 100])}
    first = (torch.full((3, 50, 100), 2.0), first_target)
    second = (torch.full((3, 70, 40), 3.0), {"boxes": torch.zeros(0, 4), "size": torch.tensor([70, 40])})
    samples, targets = collate_fn([first, second])
    assert tuple(samples.tensors.shape) == (2, 3, 96, 128)
    assert samples.image_sizes == [(50, 100), (70, 40)]
    assert samples.tensors[0, :, :50, :100].eq(2.0).all() and samples.tensors[0, :, 50:].eq(0).all()
    assert samples.tensors[1, :, :70, :40].eq(3.0).all() and samples.tensors[1, :, :, 40:].eq(0).all()
    assert int((~samples.mask[0]).sum()) == 50 * 100 and int((~samples.mask[1]).sum()) == 70 * 40
    assert targets == (first[1], second[1])


def test_area_is_the_annotation_area_scaled_with_the_box_as_in_detr():
    # 100 x 50 image, eval resize to short side 100: both axes x 2, so areas x 4 (DETR: area * ratio_w * ratio_h).
    annotations = [{"bbox": [10, 5, 20, 20], "category_id": 3, "area": 250.5},
                   {"bbox": [50, 10, 40, 30], "category_id": 4}]  # no area: the box's
    target = coco_target(annotations, image_id=5, height=50, width=100)
    image, target = build_eval_transform(100, 1000)(_image(100, 50, []), target)
    detr = to_detr_target(image, target)
    torch.testing.assert_close(detr["area"], torch.tensor([1002.0, 4800.0]))
    assert "box_area" not in detr

    # A crop keeping the left half of a 20 x 20 box keeps half of its annotated area.
    crop = RandomSizeCrop(50, 50)
    crop.make_params = lambda flat_inputs: dict(top=0, left=20, height=50, width=50)
    target = coco_target([{"bbox": [10, 5, 20, 20], "category_id": 3, "area": 300.0}], 5, 50, 100)
    image, target = v2.Compose([crop, sanitize_boxes(), v2.PILToTensor()])(_image(100, 50, []), target)
    torch.testing.assert_close(to_detr_target(image, target)["area"], torch.tensor([150.0]))
