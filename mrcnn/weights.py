"""Import weights trained elsewhere: torchvision's Mask R-CNN and its ImageNet ResNets.

Nothing is downloaded: a user passes the path of a file they have (for example
`maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth` or `resnet50-0676ba61.pth`), or a state dict.

torchvision's names and ours differ only in spelling, so the import is a key map:

    backbone.body.layer1.0.conv1.weight     -> backbone.res2.0.conv1.weight
    backbone.fpn.inner_blocks.0.0.weight    -> fpn.lateral_convs.0.weight
    rpn.head.cls_logits.weight              -> rpn.head.objectness.weight
    roi_heads.box_predictor.cls_score.bias  -> box_branch.predictor.class_logits.bias
    roi_heads.mask_predictor.conv5_mask.*   -> mask_branch.predictor.deconv.*

The import is strict: every tensor of the file is used and every tensor of the model is
filled, with matching shapes, or a `ValueError` lists what does not fit.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch
from torch import Tensor

from mrcnn.backbone import from_torchvision_resnet
from mrcnn.config import MaskRCNNConfig, torchvision_keypointrcnn_resnet50_fpn, torchvision_maskrcnn_resnet50_fpn
from mrcnn.fpn import from_torchvision_fpn
from mrcnn.model import MaskRCNN

StateDict = dict[str, Tensor]


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """Read a state dict from a `.pth` file (tensors only, never arbitrary objects)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]  # a training checkpoint that wraps the weights
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state_dict


def as_state_dict(path_or_state_dict: str | os.PathLike | StateDict) -> StateDict:
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict
    return load_state_dict_file(path_or_state_dict)


def _rpn_from_torchvision(state_dict: StateDict) -> StateDict:
    renames = ((r"^conv\.(?:0\.0\.)?", "conv."), (r"^cls_logits\.", "objectness."), (r"^bbox_pred\.", "box_deltas."))
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("rpn.head."):
            key = key[len("rpn.head."):]
            for pattern, replacement in renames:
                key = re.sub(pattern, replacement, key)
            renamed[key] = value
    return renamed


def torchvision_to_ours(state_dict: StateDict, model: MaskRCNN) -> tuple[StateDict, list[str]]:
    """Rename a torchvision `maskrcnn_resnet50_fpn` state dict for `model`.

    Returns our state dict and the torchvision keys that were not used.
    """
    ours: StateDict = {}
    ours.update({f"backbone.{k}": v for k, v in from_torchvision_resnet(state_dict, prefix="backbone.body.").items()})
    ours.update({f"fpn.{k}": v for k, v in from_torchvision_fpn(state_dict, prefix="backbone.fpn.").items()})
    ours.update({f"rpn.head.{k}": v for k, v in _rpn_from_torchvision(state_dict).items()})
    branches = [("box_branch", model.box_branch.torchvision_key_map())]
    if model.mask_branch is not None:
        legacy = "roi_heads.mask_head.mask_fcn1.weight" in state_dict  # checkpoints before torchvision 0.13
        branches.append(("mask_branch", model.mask_branch.torchvision_key_map(legacy)))
    for prefix, key_map in branches:
        for our_key, their_key in key_map.items():
            if their_key in state_dict:
                ours[f"{prefix}.{our_key}"] = state_dict[their_key]
    used = set()
    used.update(k for k in state_dict if k.startswith(("backbone.body.", "backbone.fpn.", "rpn.head.")))
    for _, key_map in branches:
        used.update(key_map.values())
    unused = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")]
    return ours, sorted(unused)


def load_strictly(module: torch.nn.Module, state_dict: StateDict, unused: list[str], source: str) -> None:
    expected = module.state_dict()
    # a trainable batch norm's step counter is no weight: torchvision's import drops it, the module keeps its own
    state_dict = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state_dict}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensors missing from the file, e.g. {missing[:3]}")
    if unexpected or unused:
        problems.append(f"{len(unexpected) + len(unused)} tensors of the file unused, e.g. {(unexpected + unused)[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shapes differ, e.g. {wrong_shape[:3]}")
    if problems:
        raise ValueError(f"{source}: does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state_dict)


def from_torchvision(path_or_state_dict: str | os.PathLike | StateDict, config: MaskRCNNConfig | None = None) -> MaskRCNN:
    """A ready `MaskRCNN` (eval mode) with the weights of a torchvision `maskrcnn_resnet50_fpn` checkpoint.

    The number of classes K is read from the file (`roi_heads.box_predictor.cls_score.weight`
    is `[K, 1024]`); the config defaults to the `torchvision_maskrcnn_resnet50_fpn` preset with
    that K, and a config of another K is an error naming both (fine-tuning to another class
    count is `load_pretrained`). Given the same image, the model gives torchvision's detections.
    """
    source = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "state dict"
    state_dict = as_state_dict(path_or_state_dict)
    class_weight = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if class_weight is None:
        raise ValueError(f"{source}: not a torchvision Mask R-CNN state dict (no roi_heads.box_predictor.cls_score.weight)")
    num_classes = int(class_weight.shape[0])
    if config is not None and config.num_classes != num_classes:
        raise ValueError(f"{source}: the file has {num_classes} classes (background included), the config "
                         f"{config.num_classes}; to fine-tune to {config.num_classes} classes, build the model and call "
                         f"load_pretrained(model, path), which re-initialises the class-specific layers")  # fmt: skip
    model = MaskRCNN(config if config is not None else torchvision_maskrcnn_resnet50_fpn(num_classes))
    ours, unused = torchvision_to_ours(state_dict, model)
    load_strictly(model, ours, unused, source)
    return model.eval()


def load_torchvision_resnet_backbone(model: MaskRCNN, path_or_state_dict: str | os.PathLike | StateDict) -> MaskRCNN:
    """Fill `model.backbone` with an ImageNet ResNet-50/101 of torchvision (the classifier `fc` is dropped).

    This is the paper's initialization (section 3.1: "ImageNet-pretrained"); the FPN and heads
    keep their random initialization. In the C4 model (`architecture="c4"`) the trunk stops at
    res4 and res5 is the head of both branches (paper Figure 4, left): the file's res5 fills it.
    """
    source = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "state dict"
    state_dict = as_state_dict(path_or_state_dict)
    renamed = from_torchvision_resnet(state_dict)  # every key but fc.* gets a name of ours
    if model.config.architecture == "c4":  # res5 is the shared head: box_branch.head.res5 (= mask_branch.head.res5)
        res5 = {key[len("res5."):]: renamed.pop(key) for key in [k for k in renamed if k.startswith("res5.")]}
        load_strictly(model.box_branch.head.res5, res5, [], source)
    load_strictly(model.backbone, renamed, [], source)
    return model


def from_torchvision_keypoint_rcnn(path_or_state_dict: str | os.PathLike | StateDict,
                                   config: MaskRCNNConfig | None = None) -> MaskRCNN:  # fmt: skip
    """A ready Keypoint R-CNN of ours (eval mode) with the weights of torchvision's `keypointrcnn_resnet50_fpn`.

    The backbone, FPN, RPN and box branch load as in `from_torchvision`, the keypoint branch
    through `KeypointBranch.torchvision_key_map`; the import is strict (every tensor used and
    filled). The numbers of classes and keypoints are read from the file; the config defaults to
    the `torchvision_keypointrcnn_resnet50_fpn` preset.
    """
    source = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "state dict"
    state_dict = as_state_dict(path_or_state_dict)
    class_weight = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    deconv_weight = state_dict.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
    if class_weight is None or deconv_weight is None:
        raise ValueError(f"{source}: not a torchvision Keypoint R-CNN state dict (no box predictor or keypoint predictor)")
    num_classes, num_keypoints = int(class_weight.shape[0]), int(deconv_weight.shape[1])
    if config is None:
        config = torchvision_keypointrcnn_resnet50_fpn(num_classes, num_keypoints)
    if (config.num_classes, config.num_keypoints) != (num_classes, num_keypoints):
        raise ValueError(f"{source}: the file has {num_classes} classes and {num_keypoints} keypoints, the config "
                         f"{config.num_classes} and {config.num_keypoints}; to fine-tune, use load_pretrained")  # fmt: skip
    model = MaskRCNN(config)
    if model.keypoint_branch is None:
        raise ValueError("the config builds no keypoint branch")
    ours, unused = torchvision_to_ours(state_dict, model)
    key_map = model.keypoint_branch.torchvision_key_map()
    ours.update({f"keypoint_branch.{k}": state_dict[v] for k, v in key_map.items() if v in state_dict})
    unused = [k for k in unused if k not in set(key_map.values())]
    load_strictly(model, ours, unused, source)
    return model.eval()


# --- fine-tuning: whatever fits, into a model of any class count -----------------------------

# The layers whose shape depends on the number of classes (or keypoints): when the counts differ
# they keep the model's fresh initialization (torchvision's fine-tuning recipe swaps exactly these).
CLASS_SPECIFIC = (
    "box_branch.predictor.class_logits.",  # [K, F] class scores
    "box_branch.predictor.box_deltas.",  # [4K, F] class-specific box deltas
    "mask_branch.predictor.mask_logits.",  # [K, C, 1, 1] one mask per class
    "keypoint_branch.predictor.deconv.",  # [C, J, 4, 4] one heatmap per keypoint
)


class PretrainedReport(NamedTuple):
    """What `load_pretrained` did, tensor by tensor (our state-dict keys)."""

    source: str  # the file, or "state dict"
    kind: str  # "mrcnn checkpoint", "torchvision Mask R-CNN", "torchvision Keypoint R-CNN" or "ImageNet ResNet"
    loaded: list[str]  # filled from the file
    reinitialised: list[str]  # class-specific, of another shape in the file: freshly initialised
    not_in_file: list[str]  # the model's, absent from the file: their initialization is kept
    unused: list[str]  # the file's, with no place in this model

    def summary(self) -> str:
        """A few lines for a person: how much was loaded, and exactly which tensors were re-initialised."""
        lines = [f"{self.source} ({self.kind}): {len(self.loaded)} tensors loaded"]
        if self.reinitialised:
            lines.append(f"re-initialised for this model's classes: {', '.join(self.reinitialised)}")
        if self.not_in_file:
            lines.append(f"{len(self.not_in_file)} tensors not in the file keep their initialization "
                         f"(e.g. {', '.join(self.not_in_file[:3])})")  # fmt: skip
        if self.unused:
            lines.append(f"{len(self.unused)} tensors of the file unused (e.g. {', '.join(self.unused[:3])})")
        return "\n".join(lines)


def our_keys(state_dict: StateDict, model: MaskRCNN) -> tuple[str, StateDict]:
    """Recognise a weights file and name its tensors as `model` names them: `(kind, state dict)`."""
    if "box_branch.predictor.class_logits.weight" in state_dict or any(k.startswith("backbone.stem.") for k in state_dict):
        return "mrcnn checkpoint", state_dict
    if "backbone.body.conv1.weight" in state_dict:
        ours, _ = torchvision_to_ours(state_dict, model)
        keypoint_map = model.keypoint_branch.torchvision_key_map() if model.keypoint_branch is not None else {}
        ours.update({f"keypoint_branch.{k}": state_dict[v] for k, v in keypoint_map.items() if v in state_dict})
        keypoints = "roi_heads.keypoint_predictor.kps_score_lowres.weight" in state_dict
        return ("torchvision Keypoint R-CNN" if keypoints else "torchvision Mask R-CNN"), ours
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        renamed = from_torchvision_resnet(state_dict)  # every key but fc.* gets a name of ours
        ours = {f"backbone.{k}": v for k, v in renamed.items() if not k.startswith("res5.") or model.config.architecture != "c4"}
        if model.config.architecture == "c4":  # res5 is the head of both branches (Figure 4, left)
            ours.update({f"box_branch.head.{k}": v for k, v in renamed.items() if k.startswith("res5.")})
        return "ImageNet ResNet", ours
    raise ValueError("not a Mask R-CNN or ResNet weights file (neither ours, nor torchvision's maskrcnn/keypointrcnn, "
                     "nor an ImageNet ResNet state dict)")  # fmt: skip


def load_pretrained(
    model: MaskRCNN, path_or_state_dict: str | os.PathLike | StateDict, verbose: bool = True
) -> PretrainedReport:
    """Load pretrained weights into `model`, whatever its number of classes: the fine-tuning recipe.

    Reads a checkpoint of ours, a torchvision `maskrcnn_resnet50_fpn` (or `keypointrcnn_resnet50_fpn`)
    state dict, or a torchvision ImageNet ResNet. Every tensor that fits is loaded; the
    class-specific layers (`CLASS_SPECIFIC`) whose shape differs, because the file was trained
    for another number of classes, keep the model's fresh initialization; what the file lacks
    (the FPN and heads of an ImageNet ResNet) keeps its initialization too. Any other tensor of
    another shape means another architecture: a `ValueError` naming it, before anything is
    loaded. Returns (and with `verbose` prints) a `PretrainedReport` naming every re-initialised
    tensor. `model.config.num_classes` is the model's own: build the model for your classes
    (`MaskRCNN(config.replace(num_classes=K))`, or `model.set_num_classes(K)`) first.
    """
    source = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "state dict"
    try:
        kind, ours = our_keys(as_state_dict(path_or_state_dict), model)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    expected = model.state_dict()
    loaded, reinitialised, unused = {}, [], []
    for key, value in ours.items():
        if key not in expected:
            unused.append(key)
        elif value.shape == expected[key].shape:
            loaded[key] = value
        elif key.startswith(CLASS_SPECIFIC):
            reinitialised.append(key)
        else:
            raise ValueError(f"{source}: {key} is {tuple(value.shape)} in the file but {tuple(expected[key].shape)} "
                             f"in the model: weights of another architecture ({kind})")  # fmt: skip
    if not loaded:
        raise ValueError(f"{source}: no tensor of the file fits this model ({kind})")
    model.load_state_dict(loaded, strict=False)
    not_in_file = [k for k in expected
                   if k not in loaded and k not in reinitialised and not k.endswith("num_batches_tracked")]  # fmt: skip
    report = PretrainedReport(source, kind, sorted(loaded), sorted(reinitialised), not_in_file, sorted(unused))
    if verbose:
        print(report.summary())
    return report
