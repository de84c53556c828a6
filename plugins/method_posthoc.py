"""Post-hoc CAM methods on the baseline classifier: Grad-CAM, Grad-CAM++, LayerCAM, Score-CAM.

Each method trains (or reuses) exactly the classifier of the ``cam`` method (tag ``round0``,
same training digest, so cells of a bench share it) and only swaps how the maps are read off the
final feature map ``A = backbone(x)`` ``[B, C, h, w]`` for the class logit
``y_c = head(GAP(dropout(A)))``:

* ``gradcam``   (Selvaraju et al., ICCV 2017): ``ReLU(sum_k a_k A_k)``, ``a_k`` = pooled dy/dA_k;
* ``gradcampp`` (Chattopadhay et al., WACV 2018): ``a_k = sum_ij alpha_ij ReLU(dy/dA_k,ij)`` with
  the closed-form ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)`` (the exponential-score trick);
* ``layercam``  (Jiang et al., TIP 2021): ``ReLU(sum_k ReLU(dy/dA_k,ij) A_k,ij)``;
* ``scorecam``  (Wang et al., CVPRW 2020): ``ReLU(sum_k s_k A_k)``, ``s_k`` the class score of
  the image masked by the min-max normalised, upsampled ``A_k``.

Value scale.  The gradient of a GAP-pooled logit carries a factor ``1/(h*w)``, so raw Grad-CAM
and LayerCAM maps shrink with the input size.  :func:`wsss_bench.engine.cams.image_cams` sums
the maps of several scales *before* normalising, which would then weight small scales more than
large ones (4x for scale 0.5 against 1.0), unlike the head CAM.  Grad-CAM and LayerCAM are
linear in the gradient, so we multiply them by ``h*w``: each map stays proportional to the
published definition (and to ``pytorch_grad_cam``), and on our bias-free GAP head Grad-CAM
equals the head CAM exactly.  Grad-CAM++ (whose alpha already cancels that factor on a GAP head)
and Score-CAM (no gradients) are left at their published scale.

Gradients are taken with respect to the feature map only: the backbone runs once without an
autograd graph and the map becomes a fresh leaf, so the graph is the tiny head, the backbone's
parameters never receive ``.grad`` and no hooks or ``requires_grad`` flags are touched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from wsss_bench.engine.model import PARENT, Classifier
from wsss_bench.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from wsss_bench.contracts import MethodContext, MethodOutcome

#: ``combine(features [B,C,h,w], gradient [B,C,h,w]) -> pre-ReLU map [B,h,w]``.
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- shared pieces ----------------------------------------------------------------------------
def classifier_logits(model: Classifier, feats: torch.Tensor, head: str = PARENT) -> torch.Tensor:
    """Class logits ``[B, K]`` from a final feature map, exactly as :meth:`Classifier.forward`.

    Dropout is kept in the expression (identity in eval mode) so that the logit differentiated
    here is the one the model computes, whatever the mode.
    """
    pooled = model.dropout(feats).mean(dim=(2, 3), keepdim=True)
    return model.heads[head](pooled).flatten(1)


def _leaf_features(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The final feature map as a new autograd leaf (backbone run without a graph)."""
    with torch.no_grad():
        feats = model.backbone(x)
    # detach() also turns an inference tensor's descendant into a plain tensor we may record on.
    return feats.detach().requires_grad_(True)


def _empty_maps(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """``[B, 0, h, w]`` for a call without classes (the feature size still needs a forward)."""
    with torch.no_grad():
        feats = model.backbone(x)
    return feats.new_zeros((feats.shape[0], 0, *feats.shape[2:]))


def gradient_cams(model: Classifier, x: torch.Tensor, channels: torch.Tensor,
                  combine: Combine) -> torch.Tensor:
    """Shared driver of the gradient methods: ``ReLU(combine(A, dy_c/dA))`` per class.

    One backbone forward serves every class; per class one backward through the head gives
    the gradients of all B images at once, because summing ``y_c`` over the batch is exact: each
    image's logit depends on its own features only (dropout, GAP and the 1x1 head are per
    image).  Returns ``[B, len(channels), h, w]``, detached.
    """
    classes = [int(c) for c in channels.tolist()]
    if not classes:
        return _empty_maps(model, x)
    # inference_mode(False): a caller inside inference mode would otherwise silently get no graph.
    with torch.inference_mode(False), torch.enable_grad():
        feats = _leaf_features(model, x)
        logits = classifier_logits(model, feats)
        maps = []
        for i, c in enumerate(classes):
            # Keep the (small) head graph only until the last class, then let autograd free it.
            (grad,) = torch.autograd.grad(logits[:, c].sum(), feats,
                                          retain_graph=i < len(classes) - 1)
            # Combine right away so that at most one [B, C, h, w] gradient is alive at a time.
            maps.append(combine(feats.detach(), grad))
        del logits
    return torch.stack(maps, dim=1).clamp_min(0)


def _gradcam_combine(feats: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # Channel weight = spatial *sum* of the gradient = h*w x Grad-CAM's mean (module docstring).
    weights = grad.sum(dim=(2, 3))
    return torch.einsum("bc,bchw->bhw", weights, feats)


def _layercam_combine(feats: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    h, w = feats.shape[-2:]
    return (grad.clamp_min(0) * feats).sum(dim=1) * (h * w)


def _gradcampp_combine(feats: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    g2 = grad * grad
    g3 = g2 * grad
    denominator = 2 * g2 + feats.sum(dim=(2, 3), keepdim=True) * g3
    # Where the denominator vanishes so does g^2 (g = 0), hence alpha = 0: divide by 1 there, as
    # the authors' code does, rather than adding an epsilon that is not small next to g^2 when
    # the gradient of a GAP logit is ~w/(h*w) ~ 1e-3.
    alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    weights = (alpha * grad.clamp_min(0)).sum(dim=(2, 3))
    return torch.einsum("bc,bchw->bhw", weights, feats)


# -- the four cam functions -------------------------------------------------------------------
def grad_cam(model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps ``[B, len(channels), h, w]`` (scaled by h*w, see the module docstring)."""
    return gradient_cams(model, x, channels, _gradcam_combine)


def grad_cam_pp(model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ maps ``[B, len(channels), h, w]`` (closed-form alpha, no epsilon)."""
    return gradient_cams(model, x, channels, _gradcampp_combine)


def layer_cam(model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """LayerCAM maps ``[B, len(channels), h, w]`` on the final map (scaled by h*w)."""
    return gradient_cams(model, x, channels, _layercam_combine)


def score_cam(model: Classifier, x: torch.Tensor, channels: torch.Tensor, batch_size: int = 8,
              max_channels: Optional[int] = 64,
              score: Literal["sigmoid", "softmax"] = "sigmoid") -> torch.Tensor:
    """Score-CAM maps ``[B, len(channels), h, w]``.

    Follows the authors' code: each activation map ``A_k`` is upsampled bilinearly to the input
    size, min-max normalised to [0, 1] and multiplied into the image; the masked image's class
    scores weight ``A_k``; maps that are constant carry no location and get weight 0.

    Shortcut: only the ``max_channels`` channels of highest mean activation (per image) are
    scored, ``None`` scores all of them.  The exact method costs one forward per channel (4096
    for ResNet-38); low-mean channels add little to ``sum_k s_k A_k`` since ``A_k`` is small
    where it is summed.  Masked images go through the network ``batch_size`` at a time, and one
    forward scores every requested class.

    ``score="sigmoid"`` weights by the class probability of the multi-label classifier (the
    authors use the softmax probability of a single-label one); ``"softmax"`` takes a softmax of
    the masked logits over the scored channels, as ``pytorch_grad_cam`` does.
    """
    classes = [int(c) for c in channels.tolist()]
    if not classes:
        return _empty_maps(model, x)
    with torch.no_grad():
        feats = model.backbone(x)
        b, c, h, w = feats.shape
        m = c if max_channels is None else min(int(max_channels), c)
        top = feats.mean(dim=(2, 3)).topk(m, dim=1).indices  # [B, m]
        acts = feats.gather(1, top[:, :, None, None].expand(-1, -1, h, w))  # [B, m, h, w]
        flat = acts.reshape(b * m, 1, h, w)
        owner = torch.arange(b, device=x.device).repeat_interleave(m)  # image of each flat row
        class_index = torch.tensor(classes, device=x.device)
        scores, valid = [], []
        for start in range(0, b * m, batch_size):
            # Masks are built per chunk: all B*m of them at input size would not fit for VOC.
            up = F.interpolate(flat[start:start + batch_size], size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
            lo = up.amin(dim=(2, 3), keepdim=True)
            span = up.amax(dim=(2, 3), keepdim=True) - lo
            mask = (up - lo) / torch.where(span > 0, span, torch.ones_like(span))
            masked = x[owner[start:start + batch_size]] * mask
            logits = classifier_logits(model, model.backbone(masked))
            scores.append(logits.index_select(1, class_index))
            valid.append(span.flatten() > 0)
        s = torch.cat(scores).view(b, m, len(classes))
        ok = torch.cat(valid).view(b, m, 1)
        if score == "sigmoid":
            weights = torch.sigmoid(s) * ok
        else:
            # Constant maps are left out of the softmax; an image with none left gets zeros.
            weights = s.masked_fill(~ok, float("-inf")).softmax(dim=1).nan_to_num(0.0)
        maps = torch.einsum("bmk,bmhw->bkhw", weights.to(acts.dtype), acts)
    return maps.clamp_min(0)


# -- options and methods ----------------------------------------------------------------------
class GradientCamOptions(BaseModel):
    """Grad-CAM, Grad-CAM++ and LayerCAM have no options: training follows the run config."""

    model_config = ConfigDict(extra="forbid")


class ScoreCamOptions(BaseModel):
    """Options of ``scorecam``."""

    model_config = ConfigDict(extra="forbid")
    # 8, not more: on a CPU larger batches of input-sized images fall out of cache (full-width
    # ResNet-38, 250x188, 2 threads: 38 s with 8, 47 s with 32) and peak memory grows with the
    # batch (+0.8 GB vs +2.2 GB there; scale 2 on VOC images is 16 times the pixels).
    batch_size: int = Field(default=8, ge=1, description="masked images per forward pass")
    max_channels: Optional[int] = Field(
        default=64, ge=1, description="score only this many highest-mean channels (null: all)")
    score: Literal["sigmoid", "softmax"] = Field(
        default="sigmoid", description="channel weight: class probability or softmax over channels")


class PosthocCam:
    """Train the baseline classifier (round 0), then read its maps with :meth:`cam_fn`."""

    #: Method name: also the evaluation stage and the ``cams/round0-<name>`` folder suffix.
    name: ClassVar[str] = ""

    def cam_fn(self, model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """The method's :data:`~wsss_bench.engine.cams.CamFunction`."""
        raise NotImplementedError

    def run(self, ctx: MethodContext) -> MethodOutcome:
        """Train (or reuse) ``round0`` exactly like ``cam``, then score this method's maps."""
        model = ctx.new_classifier()
        ctx.train(model, "round0")
        rows = ctx.cams_and_scores(model, "round0", row={"round": 0, "final": True},
                                   cam_fn=self.cam_fn, stage=self.name)
        return {"rows": rows}


class GradCam(PosthocCam):
    """Grad-CAM on the baseline classifier."""

    name = "gradcam"

    def __init__(self) -> None:
        self.options = GradientCamOptions()

    def cam_fn(self, model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return grad_cam(model, x, channels)


class GradCamPlusPlus(PosthocCam):
    """Grad-CAM++ on the baseline classifier."""

    name = "gradcampp"

    def __init__(self) -> None:
        self.options = GradientCamOptions()

    def cam_fn(self, model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return grad_cam_pp(model, x, channels)


class LayerCam(PosthocCam):
    """LayerCAM on the baseline classifier's final feature map."""

    name = "layercam"

    def __init__(self) -> None:
        self.options = GradientCamOptions()

    def cam_fn(self, model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return layer_cam(model, x, channels)


class ScoreCam(PosthocCam):
    """Score-CAM on the baseline classifier (top-``max_channels`` channels, batched)."""

    name = "scorecam"

    def __init__(self, **options: Any) -> None:
        self.options = ScoreCamOptions(**options)

    def cam_fn(self, model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        o = self.options
        return score_cam(model, x, channels, o.batch_size, o.max_channels, o.score)


#: The methods of this plugin by name (tests collect their ``cam_fn`` from here).
METHODS: dict[str, type[PosthocCam]] = {cls.name: cls for cls in (GradCam, GradCamPlusPlus, LayerCam, ScoreCam)}


@hookimpl
def register_methods(register: Any) -> None:
    register("gradcam", GradCam, help="Grad-CAM on the baseline classifier (post-hoc)",
             options=GradientCamOptions)
    register("gradcampp", GradCamPlusPlus, help="Grad-CAM++ on the baseline classifier (post-hoc)",
             options=GradientCamOptions)
    register("layercam", LayerCam, help="LayerCAM on the baseline classifier's final map (post-hoc)",
             options=GradientCamOptions)
    register("scorecam", ScoreCam, help="Score-CAM on the baseline classifier (post-hoc, top-k channels)",
             options=ScoreCamOptions)
