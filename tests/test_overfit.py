"""A small PVT-DETR memorises a handful of generated demo images through the real engine (slow, deterministic).

The end-to-end check that data, matcher, losses, optimiser, engine, post-processing and the COCO evaluator fit
together: if any of them is wrong (box format, label ids, image size, scores), a model cannot reach a high AP50
even on its own training images.
"""

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

import main
from datasets import build_dataset, coco_split_paths, collate_fn, num_classes_from_coco
from datasets.coco import CocoDetection
from pvt_detr import build_model
from pvt_detr.preprocess import build_eval_transform
from training.engine import evaluate, train_one_epoch
from training.optim import build_lr_scheduler, build_optimizer

SIZE, IMAGES, EPOCHS = 64, 8, 300
FLAGS = ["--dataset_file", "demo", "--demo_train_images", str(IMAGES), "--demo_val_images", "1",
         "--demo_image_size", str(SIZE), "--train_sizes", str(SIZE), "--max_size", str(SIZE), "--test_size", str(SIZE),
         "--backbone", "pvt_nano", "--backbone_stages", "2", "--drop_path", "0", "--hidden_dim", "64", "--nheads", "4",
         "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "128", "--dropout", "0", "--num_queries", "10",
         "--anchor_queries", "--two_stage", "--focal_loss", "--cls_loss_coef", "2",
         "--lr", "1e-3", "--lr_backbone", "1e-3", "--clip_max_norm", "1.0", "--warmup_iters", "20",
         "--batch_size", str(IMAGES), "--epochs", str(EPOCHS), "--lr_drop", str(EPOCHS * 5 // 6), "--seed", "0"]


@pytest.fixture
def one_thread():
    """One intra-op thread: the same float results on any machine and no OpenMP oversubscription on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_small_model_memorises_a_few_demo_images(tmp_path, one_thread):
    """8 images of 64 px, 300 steps (about 20 s on one core): AP50 1.0 on the training images."""
    args = main.get_args_parser().parse_args(FLAGS + ["--coco_path", str(tmp_path / "demo")])
    torch.manual_seed(args.seed)
    train = build_dataset("train", args)
    args.num_classes = num_classes_from_coco(train.coco)
    # The same images with the evaluation transform: what was memorised is measured on exactly those.
    images, annotations = coco_split_paths(args.coco_path, "train")
    train_eval = CocoDetection(str(images), str(annotations), build_eval_transform(args.test_size, args.max_size))
    loader = DataLoader(train, batch_size=args.batch_size, sampler=RandomSampler(train,
                        generator=torch.Generator().manual_seed(0)), collate_fn=collate_fn, drop_last=True)
    eval_loader = DataLoader(train_eval, batch_size=args.batch_size, collate_fn=collate_fn)

    model, criterion, postprocessors = build_model(args)
    optimizer = build_optimizer(model, args)
    scheduler = build_lr_scheduler(optimizer, args, len(loader))
    device = torch.device("cpu")
    for epoch in range(args.epochs):
        stats = train_one_epoch(model, criterion, loader, optimizer, scheduler, device, epoch,
                                clip_max_norm=args.clip_max_norm)
    result, _ = evaluate(model, criterion, postprocessors, eval_loader, train.coco, device)
    print(f"after {args.epochs} steps: train loss {stats['loss']:.3f}, AP {result['AP']:.3f}, "
          f"AP50 {result['AP50']:.3f}")
    assert result["AP50"] >= 0.9, result["coco_eval_bbox"]
