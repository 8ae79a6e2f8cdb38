"""`torch.compile` of the detector: the compiler gets the plain ops (no hand-fused eager CPU kernels) and the
compiled model computes what the eager one does."""

import pytest
import torch

from main import get_args_parser
from pvt_detr import build_model


@pytest.mark.slow
def test_compiled_detector_matches_eager_on_a_padded_batch():
    args = get_args_parser().parse_args([
        "--backbone", "pvt_nano", "--backbone_stages", "3", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1",
        "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "5", "--num_classes", "4"])
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    images = [torch.rand(3, 64, 96), torch.rand(3, 80, 64)]  # padded to 96 x 96 with a mask
    with torch.no_grad():
        got = torch.compile(model)(images)
        expected = model(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert not torch.equal(expected["pred_boxes"][0], expected["pred_boxes"][1])  # the two images differ
