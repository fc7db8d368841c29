"""torch.compile on inference: few graph breaks, each an explicit boundary, and the same detections.

The data-dependent steps of inference (RoIAlign's sampling pattern, the RPN's and the box
branch's selections with NMS) are `torch.compiler.disable` boundaries; everything else (the
transform, backbone, FPN, RPN head and decoding, box and mask heads, pasting) must trace with no
break of its own: no `.item()`, no `bool(tensor)`, no output whose size depends on values.
benchmarks/compile.py records the counts and the times.
"""

import pytest
import torch

from mrcnn.config import shapes_small, torchvision_maskrcnn_resnet50_fpn
from mrcnn.model import MaskRCNN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
BOUNDARY = "torch.compiler.disable()"  # how dynamo names a break at an explicit boundary


def explain(model: MaskRCNN, image: torch.Tensor):
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.eval())([image])
    torch._dynamo.reset()
    return explanation


def assert_only_boundaries(explanation, most: int) -> None:
    reasons = [f"{r.reason.splitlines()[0]} at {r.user_stack[-1].filename}:{r.user_stack[-1].lineno}"
               for r in explanation.break_reasons if BOUNDARY not in r.reason]  # fmt: skip
    assert reasons == []  # every break is a boundary, none a host read or a dynamic shape
    assert explanation.graph_break_count <= most


def test_shapes_small_inference_breaks_only_at_its_boundaries():
    torch.manual_seed(0)
    assert_only_boundaries(explain(MaskRCNN(shapes_small()), torch.rand(3, 128, 128)), most=10)


@pytest.mark.slow
def test_r50_fpn_inference_has_at_most_ten_graph_breaks():
    """The issue's measure: 57 breaks (torch 2.11) before, torchvision's maskrcnn_resnet50_fpn 40."""
    torch.manual_seed(0)
    explanation = explain(MaskRCNN(torchvision_maskrcnn_resnet50_fpn()), torch.rand(3, 240, 320))
    assert_only_boundaries(explanation, most=10)
    backbone = max(explanation.graphs, key=lambda graph: len(graph.graph.nodes))  # backbone and FPN: one graph
    convolutions = [n for n in backbone.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convolutions) >= 53 + 8  # the 53 convolutions of ResNet-50 and the FPN's 8


@pytest.mark.slow
def test_compiled_shapes_small_gives_the_eager_detections():
    torch.manual_seed(0)
    model = MaskRCNN(shapes_small()).eval()
    image = torch.rand(3, 128, 128)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model([image])[0]
        found = torch.compile(model)([image])[0]
    torch._dynamo.reset()
    assert len(expected["boxes"]) > 0 and torch.equal(found["labels"], expected["labels"])
    assert torch.allclose(found["boxes"], expected["boxes"], atol=1e-4, rtol=0)
    assert torch.allclose(found["scores"], expected["scores"], atol=1e-5, rtol=0)
    assert torch.allclose(found["masks"], expected["masks"], atol=1e-4, rtol=0)
