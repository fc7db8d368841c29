r"""Export for deployment: the model as ONNX graphs that onnxruntime runs, and the steps between them in numpy.

    mrcnn export --weights runs/train/checkpoint.pt --output runs/export
    python runs/export/detector.py picture.png          # numpy and onnxruntime only (Pillow to read the picture)

`export_onnx(model, directory)` writes a folder that runs without torch and without this library:

    features.onnx   batch `[1, 3, H, W]` (normalized, resized, padded; H and W dynamic) -> the maps the
                    RoIs are pooled from (P2..P5; one map for C4 and C5) and the RPN's candidates: the
                    `pre_nms_top_n` best anchors of each level, decoded, as boxes `[K, 4]`, scores `[K]`
                    (sigmoid) and levels `[K]` int64
    box_head.onnx   those maps and proposals `[R, 4]` -> boxes `[R, K, 4]` (one per class, decoded) and
                    class probabilities `[R, K]`
    mask_head.onnx  those maps, detected boxes `[D, 4]` and labels `[D]` -> mask probabilities `[D, 1, M, M]`
                    of each detection's class (models with a mask branch)
    detector.py     everything else, in numpy (a copy of mrcnn/export_runtime.py): resizing the input,
                    clipping, NMS, mapping the boxes back and pasting the masks; it runs the graphs
    config.json     the numbers those steps read (sizes, thresholds), and the graphs' names

The graphs hold all the network (every convolution and fully connected layer, RoIAlign, the box
decoding, the top-k per level); what stays in numpy is what ONNX and `torch.export` cannot hold
as this library computes it:

- **NMS.** Ours is a loop whose number of rounds depends on the boxes (Cluster-NMS, see
  mrcnn/boxes.py), which `torch.export` cannot trace; ONNX's `NonMaxSuppression` is another
  algorithm (its own tie order, threshold compared in float32, at most N boxes per class), and
  everything after NMS (the box head runs on the kept proposals, the mask head on the kept
  detections) would have sizes known only at run time. So the graphs end where NMS begins, and
  the few lines of greedy NMS run in numpy, with this library's rules.
- **Resizing the input.** The scale depends on the image size through `min`/`max` and the
  output size is `floor(h s)`: computing sizes from sizes is easy in numpy and brittle in a graph
  with dynamic shapes. numpy resizes with PyTorch's bilinear arithmetic.
- **Pasting the masks.** The output is the size of the original image, which no input of the
  mask graph has as a shape; pasting is two small matrix products per detection, in numpy.
- **RoIAlign.** The CPU path of mrcnn/roi_align_cpu.py builds a sparse matrix whose size depends
  on where the RoIs fall, and the GPU path is a Triton kernel; neither exports. The graphs pool
  with `GatherRoIAlign` instead: the same definition (mrcnn/roi_align.py) with a fixed sampling
  grid, as gathers of fixed shape, equal to the model's RoIAlign to float rounding.

Limits: RoIAlign poolers with a fixed `sampling_ratio` (adaptive sampling sizes each RoI's grid by
its values) over consecutive pyramid levels, no keypoint branch, one image per call; float32.
The exported detections equal the model's to float rounding: boxes well within a pixel, the same
labels; near-ties (a score at the threshold, an IoU at the NMS threshold) may decide differently.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn import export_runtime
from mrcnn.box_head import boxes_to_rois
from mrcnn.mask_head import MaskBranch
from mrcnn.model import MaskRCNN
from mrcnn.poolers import MultiLevelRoIAlign, fpn_level
from mrcnn.roi_align import bilinear_neighbours, sampling_grid

FORMAT = "mrcnn-onnx"
VERSION = 1
OPSET = 18
GRAPHS = {"features": "features.onnx", "box_head": "box_head.onnx", "mask_head": "mask_head.onnx"}
RUNTIME_NAME = "detector.py"
CONFIG_NAME = "config.json"
OUTPUT_FILES = (*GRAPHS.values(), CONFIG_NAME, RUNTIME_NAME)  # what an export may write into its folder


class GatherRoIAlign(nn.Module):
    """Multi-level RoIAlign as fixed-size gathers: the numbers of `MultiLevelRoIAlign`, exportable.

    Each RoI is pooled from the level of its size (FPN's equation 1, `fpn_level`). With a fixed
    `sampling_ratio` G, every bin of every RoI reads the same number of pixels: G x G samples,
    each the bilinear mix of 4 neighbours. So the pooling is 4 G^2 gathers of `[R, P, P]` feature
    rows, each weighted and summed, whatever the RoIs are:

        out[r, :, p, q] = 1 / G^2 * sum_{i, j < G} sum_{a, b in (low, high)} w_y[r, p, i, a] w_x[r, q, j, b] F_r[y_a, x_b]

    with `w_y` (and `w_x`) the bilinear weights of `mrcnn.roi_align.bilinear_neighbours`, zero for a
    sample outside the map. The feature maps are one table of rows (all levels, channels last), so
    each gather reads the RoI's own level: its rows start where its level's do.

    Args:
        pooler: the model's `MultiLevelRoIAlign`, whose output size, strides, sampling ratio and
            alignment this one takes.
    """

    def __init__(self, pooler: nn.Module):
        super().__init__()
        if not isinstance(pooler, MultiLevelRoIAlign):
            raise ValueError(f"export needs RoIAlign poolers, got {type(pooler).__name__} "
                             "(the RoIPool and RoIWarp ablations do not export)")
        if pooler.sampling_ratio <= 0:
            raise ValueError("export needs a fixed roi_sampling_ratio: adaptive sampling sizes each RoI's grid by its values")
        if len(pooler.map_of_level) != len(pooler.levels):
            raise ValueError(f"export needs pyramid levels that follow each other, got strides {pooler.strides}")
        self.output_size, self.sampling_ratio, self.aligned = pooler.output_size, pooler.sampling_ratio, pooler.aligned
        self.strides, self.levels = pooler.strides, pooler.levels

    def forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """features: one `[N, C, H_l, W_l]` map per level; rois `[R, 5]` -> `[R, C, P, P]`."""
        size, grid = self.output_size, self.sampling_ratio
        channels = features[0].shape[1]
        level = fpn_level(rois[:, 1:], self.levels[0], self.levels[-1]) - self.levels[0]  # [R]
        table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features])  # [sum_l N H_l W_l, C]
        image = rois[:, 0].to(torch.int64)[:, None, None]  # [R, 1, 1]
        rows = columns = y_weights = x_weights = None  # each a (low, high) pair of [R, P, G], from the RoI's level
        first_row = 0  # of the level in the table
        for index, (feature, stride) in enumerate(zip(features, self.strides)):
            height, width = feature.shape[-2:]
            y, x, y_used, x_used, _ = sampling_grid(rois, (size, size), 1.0 / stride, grid, self.aligned)  # [R, P, G]
            y_low, y_high, hy, ly, y_inside = bilinear_neighbours(y, height)  # each [R, P, G]
            x_low, x_high, hx, lx, x_inside = bilinear_neighbours(x, width)  # each [R, P, G]
            y_keep, x_keep = (y_inside & y_used).to(rois.dtype), (x_inside & x_used).to(rois.dtype)  # 0: no contribution
            start = first_row + image * (height * width)  # [R, 1, 1]: the RoI's image on this level
            found = ((start + y_low * width, start + y_high * width), (x_low, x_high),  # rows, columns
                     (hy * y_keep, ly * y_keep), (hx * x_keep, lx * x_keep))  # y and x weights
            if index == 0:
                rows, columns, y_weights, x_weights = found
            else:  # the RoIs of this level take its values
                on_level = (level == index)[:, None, None]  # [R, 1, 1]
                rows, columns, y_weights, x_weights = (
                    tuple(torch.where(on_level, new, old) for new, old in zip(pair_new, pair_old))
                    for pair_new, pair_old in zip(found, (rows, columns, y_weights, x_weights))
                )
            first_row = first_row + feature.shape[0] * height * width
        pooled = torch.zeros(rois.shape[0], size, size, channels, dtype=table.dtype, device=table.device)  # [R, P, P, C]
        for i in range(grid):
            for j in range(grid):
                for a in range(2):
                    for b in range(2):
                        pixel = rows[a][:, :, i, None] + columns[b][:, None, :, j]  # [R, P, P]
                        weight = y_weights[a][:, :, i, None] * x_weights[b][:, None, :, j]  # [R, P, P]
                        pooled = pooled + table[pixel] * weight[..., None].to(table.dtype)  # [R, P, P, C]
        pooled = pooled / (grid * grid)  # the average over the G x G samples of a bin
        return pooled.permute(0, 3, 1, 2).contiguous()  # [R, C, P, P]


class FeatureGraph(nn.Module):
    """features.onnx: backbone, FPN, RPN head, anchors, decoding and the top-k of each level, for one image."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, batch: Tensor) -> tuple[Tensor, ...]:
        """batch `[1, 3, H, W]` -> the RoI maps `[1, C, H_l, W_l]`, then boxes `[K, 4]`, scores `[K]`, levels `[K]`."""
        features, roi_features = self.model.feature_maps(batch)
        anchors_per_level, objectness, _, proposals = self.model.rpn.predict(features, batch.shape[-2:])
        boxes, scores, levels = self.model.rpn.top_candidates(proposals, objectness, [a.shape[0] for a in anchors_per_level])
        return (*roi_features, boxes[0], scores[0], levels[0])


class BoxGraph(nn.Module):
    """box_head.onnx: RoIAlign, box head and predictor, decoding and softmax (`refine_boxes` before the clipping)."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        branch = model.box_branch
        self.pooler, self.head, self.predictor = GatherRoIAlign(branch.pooler), branch.head, branch.predictor
        self.box_coder = branch.box_coder

    def forward(self, features: list[Tensor], proposals: Tensor) -> tuple[Tensor, Tensor]:
        """The RoI maps and proposals `[R, 4]` -> boxes `[R, K, 4]` (one per class) and probabilities `[R, K]`."""
        class_logits, box_deltas = self.predictor(self.head(self.pooler(features, boxes_to_rois([proposals]))))
        return self.box_coder.decode(box_deltas, proposals), F.softmax(class_logits, dim=-1)


class MaskGraph(nn.Module):
    """mask_head.onnx: the model's `MaskBranch.predict` with `GatherRoIAlign` as its pooler."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        branch = model.mask_branch
        self.branch = MaskBranch(GatherRoIAlign(branch.pooler), branch.head, branch.predictor, loss=branch.loss_function)

    def forward(self, features: list[Tensor], boxes: Tensor, labels: Tensor) -> Tensor:
        """The RoI maps, boxes `[D, 4]` and labels `[D]` -> probabilities `[D, 1, M, M]` of each detection's class."""
        return self.branch.predict(features, [{"boxes": boxes, "labels": labels}])[0]["masks"]


def check_exportable(model: MaskRCNN) -> None:
    """Raise a `ValueError` naming what does not export: a keypoint branch, a pooler other than RoIAlign
    with a fixed sampling grid over consecutive levels."""
    if model.keypoint_branch is not None:
        raise ValueError("export does not cover the keypoint branch (config.num_keypoints > 0)")
    GatherRoIAlign(model.box_branch.pooler)  # raises for an unsupported pooler
    if model.mask_branch is not None:
        GatherRoIAlign(model.mask_branch.pooler)


def runtime_config(model: MaskRCNN, feature_names: list[str]) -> dict:
    """What `export_runtime` reads: the transform's sizes, the thresholds of the RPN and the box branch."""
    transform, rpn, box = model.transform, model.rpn, model.box_branch
    return {
        "format": FORMAT, "version": VERSION,
        "graphs": {name: file for name, file in GRAPHS.items() if name != "mask_head" or model.mask_branch is not None},
        "feature_names": feature_names,
        "min_size": transform.min_size[-1], "max_size": transform.max_size, "size_divisible": transform.size_divisible,
        "image_mean": list(transform.image_mean), "image_std": list(transform.image_std),
        "rpn_min_size": rpn.min_size, "rpn_score_thresh": rpn.score_thresh, "rpn_nms_thresh": rpn.nms_thresh,
        "rpn_post_nms_top_n": rpn.post_nms_top_n["testing"],
        "box_score_thresh": box.score_thresh, "box_nms_thresh": box.nms_thresh, "detections_per_image": box.detections_per_image,
        "num_classes": model.config.num_classes, "model_config": dataclasses.asdict(model.config),
    }  # fmt: skip


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic_shapes: tuple) -> None:  # fmt: skip
    """One graph to ONNX through `torch.export` (the dynamo exporter), weights inside the file."""
    program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=input_names, output_names=output_names,
                                dynamic_shapes=dynamic_shapes, opset_version=OPSET, verbose=False)  # fmt: skip
    program.save(str(path), external_data=False)


@torch.no_grad()
def export_onnx(model: MaskRCNN, directory: str | Path, example_size: tuple[int, int] = (160, 224)) -> Path:
    """Write the exported model (module docstring) into `directory` (created); returns it.

    The graphs are traced once, on an example of `example_size` (any size gives the same graphs:
    H, W and the numbers of RoIs are dynamic). The model is put in eval mode, on the CPU, in float32.
    """
    check_exportable(model)
    model = model.eval().float().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    divisible = model.transform.size_divisible
    height, width = (-(-s // divisible) * divisible for s in example_size)  # padded as the transform pads
    batch = torch.rand(1, 3, height, width)
    outputs = FeatureGraph(model)(batch)
    maps = list(outputs[:-3])
    feature_names = [f"features_{index}" for index in range(len(maps))]
    scale_h, scale_w = torch.export.Dim("height_blocks", min=2, max=4096), torch.export.Dim("width_blocks", min=2, max=4096)
    export_graph(FeatureGraph(model), (batch,), directory / GRAPHS["features"], ["batch"],
                 [*feature_names, "boxes", "scores", "levels"], ({2: divisible * scale_h, 3: divisible * scale_w},))  # fmt: skip

    map_shapes = [{2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO} for _ in maps]
    proposals = outputs[-3][:37].clamp(min=0)  # [R, 4], a few valid boxes
    proposals = torch.cat([proposals[:, :2], proposals[:, :2] + 8 + 40 * torch.rand(proposals.shape[0], 2)], dim=1)
    export_graph(BoxGraph(model), (maps, proposals), directory / GRAPHS["box_head"], [*feature_names, "proposals"],
                 ["boxes", "scores"], (map_shapes, {0: torch.export.Dim("proposals", min=2)}))  # fmt: skip
    if model.mask_branch is not None:
        boxes, labels = proposals[:11], torch.arange(11) % (model.config.num_classes - 1) + 1
        detections = torch.export.Dim("detections", min=2)
        export_graph(MaskGraph(model), (maps, boxes, labels), directory / GRAPHS["mask_head"], [*feature_names, "boxes", "labels"],
                     ["masks"], (map_shapes, {0: detections}, {0: detections}))  # fmt: skip
    (directory / CONFIG_NAME).write_text(json.dumps(runtime_config(model, feature_names), indent=2) + "\n")
    shutil.copyfile(export_runtime.__file__, directory / RUNTIME_NAME)
    return directory
