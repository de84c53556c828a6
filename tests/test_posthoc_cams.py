"""Post-hoc CAM functions (``plugins/method_posthoc.py``): conformance, identities, references.

* every registered method offering a ``cam_fn`` (plus the head-weight CAM) obeys the
  :data:`~wsss_bench.engine.cams.CamFunction` contract and leaves the model untouched;
* on our bias-free GAP head Grad-CAM, LayerCAM and Grad-CAM++ have closed forms in the head
  weights, checked exactly;
* Grad-CAM, Grad-CAM++ and LayerCAM agree with ``pytorch_grad_cam`` at feature resolution;
  Score-CAM agrees with a naive one-forward-per-channel loop.
"""
from __future__ import annotations

import copy
import gc
import weakref
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import wsss_bench
from wsss_bench.engine.cams import head_cams, image_cams
from wsss_bench.engine.model import Classifier
from wsss_bench_plugins import method_posthoc as posthoc

NUM_CLASSES = 5
ALL = torch.arange(NUM_CLASSES)

# Keep Score-CAM cheap in the conformance test; batch_size 5 makes chunks straddle images.
FAST_OPTIONS: dict[str, dict[str, Any]] = {"scorecam": {"max_channels": 16, "batch_size": 5}}


def _cam_method_names() -> list[str]:
    """Every registered method whose object offers a ``cam_fn`` (collected at import)."""
    names = []
    for name in wsss_bench.list_methods():
        method = wsss_bench.create_method(name, **FAST_OPTIONS.get(name, {}))
        if callable(getattr(method, "cam_fn", None)):
            names.append(name)
    return names


CAM_METHODS = _cam_method_names()


def _cam_fn(name: str) -> Callable[..., torch.Tensor]:
    if name == "head_cams":
        # image_cams only ever calls the head CAM in inference mode (it builds no graph there).
        def in_inference_mode(model: Classifier, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return head_cams()(model, x, channels)

        return in_inference_mode
    return wsss_bench.create_method(name, **FAST_OPTIONS.get(name, {})).cam_fn


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models: a second intra-op thread gains nothing, and on a busy shared CPU OpenMP's
    spin-waiting made this file 10x slower.  Restored afterwards for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _classifier(backbone: str, seed: int = 0, **options: Any) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(wsss_bench.create_backbone(backbone, **options), NUM_CLASSES)
    # Non-trivial BN statistics, so eval-mode features are not just ReLU(conv) of the input.
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


@pytest.fixture(scope="module")
def r38() -> Classifier:
    """Tiny ResNet-38 (256 channels, stride 8), eval mode, stem frozen by hand."""
    model = _classifier("resnet38d", width=0.0625)
    # A frozen parameter checks that requires_grad flags are left exactly as found.
    for p in model.backbone.conv1a.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def r18() -> Classifier:
    """timm ResNet-18 at output stride 8 (512 channels), eval mode."""
    return _classifier("timm:resnet18", output_stride=8)


@pytest.fixture(params=["r38", pytest.param("r18", marks=pytest.mark.slow)])
def model(request: pytest.FixtureRequest) -> Classifier:
    """Each backbone in turn (the timm one takes seconds to build, hence slow)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _hooks(model: nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, attr, None):
                found.append(f"{name}.{attr}")
    return found


# -- registration -----------------------------------------------------------------------------
def test_all_posthoc_methods_registered_with_cam_fn() -> None:
    assert {"gradcam", "gradcampp", "layercam", "scorecam"} <= set(CAM_METHODS)
    assert set(posthoc.METHODS) == {"gradcam", "gradcampp", "layercam", "scorecam"}
    assert "cam" not in CAM_METHODS  # the baseline reads head weights through the default path


def test_options_validated() -> None:
    with pytest.raises(wsss_bench.UserError, match="unknown"):
        wsss_bench.create_method("gradcam", unknown=1)
    with pytest.raises(wsss_bench.UserError, match="max_channels"):
        wsss_bench.create_method("scorecam", max_channels=0)
    opts = wsss_bench.create_method("scorecam").options
    assert (opts.batch_size, opts.max_channels, opts.score) == (8, 64, "sigmoid")


class FakeContext:
    """Records the calls a method makes on its context."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def new_classifier(self) -> str:
        return "model"

    def train(self, model: Any, tag: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("train", (model, tag, *args), kwargs))

    def cams_and_scores(self, model: Any, tag: str, **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append(("cams", (model, tag), kwargs))
        return [{"miou": 0.5}]


@pytest.mark.parametrize("name", sorted(posthoc.METHODS))
def test_run_trains_round0_like_cam_and_scores_with_cam_fn(name: str) -> None:
    ctx = FakeContext()
    method = wsss_bench.create_method(name)
    assert method.run(ctx) == {"rows": [{"miou": 0.5}]}
    # Same call as method_cam (no extra targets/seed offset): the training digest is shared.
    assert ctx.calls[0] == ("train", ("model", "round0"), {})
    kind, args, kwargs = ctx.calls[1]
    assert (kind, args) == ("cams", ("model", "round0"))
    assert kwargs["row"] == {"round": 0, "final": True} and kwargs["stage"] == name
    assert kwargs["cam_fn"] == method.cam_fn


# -- conformance ------------------------------------------------------------------------------
def test_logits_from_features_match_forward(model: Classifier, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)[0]["parent"]
        got = posthoc.classifier_logits(model, model.backbone(x))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", CAM_METHODS + ["head_cams"])
def test_cam_fn_conformance(name: str, r38: Classifier, x: torch.Tensor) -> None:
    model = r38
    cam_fn = _cam_fn(name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    channels = torch.tensor([3, 0, 4])
    saved: "weakref.WeakSet[Any]" = weakref.WeakSet()

    class Saved:  # weak-referenceable wrapper of every tensor autograd saves for backward
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    def pack(t: torch.Tensor) -> Saved:
        box = Saved(t)
        saved.add(box)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        cams = cam_fn(model, x, channels)
    gc.collect()
    assert len(saved) == 0, "the autograd graph outlived the call"

    h, w = model.backbone(x).shape[-2:]
    assert cams.shape == (2, 3, h, w)
    assert torch.isfinite(cams).all() and (cams >= 0).all()
    assert not cams.requires_grad and cams.grad_fn is None
    assert torch.equal(cams, cam_fn(model, x, channels)), "not deterministic"
    # Channel order and subsets are respected.
    torch.testing.assert_close(cam_fn(model, x, torch.tensor([4])), cams[:, 2:3], rtol=1e-5, atol=1e-7)
    assert cam_fn(model, x, torch.tensor([], dtype=torch.long)).shape == (2, 0, h, w)
    # Callers inside inference mode still get the same maps.
    with torch.inference_mode():
        torch.testing.assert_close(cam_fn(model, x, channels), cams, rtol=1e-5, atol=1e-7)

    assert not model.training
    assert _hooks(model) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8))
    maps = image_cams(model, image, [0, 2], scales=[1.0, 0.5], flip=True,
                      device=torch.device("cpu"), cam_fn=cam_fn)
    assert maps.shape == (2, 32, 40) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    for m in maps:
        if m.max() > 0:  # image_cams divides by max + 1e-5, hence not exactly 1
            assert m.max() == pytest.approx(1.0, abs=1e-3)


def test_gradient_cams_work_in_train_mode_without_touching_it(r38: Classifier, x: torch.Tensor) -> None:
    model = copy.deepcopy(r38).train()
    cams = posthoc.grad_cam(model, x, ALL)
    assert model.training and cams.shape[:2] == (2, NUM_CLASSES) and (cams >= 0).all()


# -- closed forms on a bias-free GAP head ------------------------------------------------------
def test_gradcam_equals_head_cam_on_gap_head(model: Classifier, x: torch.Tensor) -> None:
    """dy_c/dA_k = w_ck/(h*w) everywhere, so Grad-CAM = ReLU(sum_k w_ck A_k)/(h*w); we keep h*w."""
    with torch.no_grad():
        expected = head_cams()(model, x, ALL)
    got = posthoc.grad_cam(model, x, ALL)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
    assert (got > 0).any()


def test_layercam_and_gradcampp_closed_forms(r38: Classifier, x: torch.Tensor) -> None:
    """LayerCAM = ReLU(sum_k ReLU(w_ck) A_k); Grad-CAM++ weight = ReLU(w_ck)/(2 + mean(A_k) w_ck)."""
    with torch.no_grad():
        feats = r38.backbone(x)
    weight = r38.heads["parent"].weight.detach()[:, :, 0, 0]  # [K, C]
    layer = torch.relu(torch.einsum("kc,bchw->bkhw", weight.clamp_min(0), feats))
    torch.testing.assert_close(posthoc.layer_cam(r38, x, ALL), layer, rtol=1e-4, atol=1e-6)
    means = feats.mean(dim=(2, 3))  # [B, C]
    pp_weights = weight.clamp_min(0) / (2 + means[:, None, :] * weight)  # [B, K, C]
    pp = torch.relu(torch.einsum("bkc,bchw->bkhw", pp_weights, feats))
    torch.testing.assert_close(posthoc.grad_cam_pp(r38, x, ALL), pp, rtol=1e-4, atol=1e-6)


# -- Score-CAM against a naive loop -----------------------------------------------------------
class ToyBackbone(nn.Module):
    """Conv(stride 8) + ReLU whose channel 0 is the constant 1 (a map without location)."""

    out_channels = 6
    stride = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.out_channels, 8, stride=8)
        with torch.no_grad():
            self.conv.weight[0].zero_()
            self.conv.bias[0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def _naive_score_cam(model: Classifier, x: torch.Tensor, channels: torch.Tensor, max_channels: int,
                     score: str) -> torch.Tensor:
    """The authors' loop: one forward per (image, channel), constant maps skipped."""
    out = []
    with torch.no_grad():
        for img in x:
            img = img[None]
            feats = model.backbone(img)[0]
            top = feats.mean(dim=(1, 2)).argsort(descending=True)[:max_channels]
            logits, keep = [], []
            for k in top.tolist():
                up = torch.nn.functional.interpolate(feats[k][None, None], size=img.shape[-2:],
                                                     mode="bilinear", align_corners=False)
                keep.append(bool(up.max() > up.min()))
                norm = (up - up.min()) / (up.max() - up.min()) if keep[-1] else up * 0
                logits.append(model(img * norm)[0]["parent"][0, channels])
            s = torch.stack(logits)  # [m, n]
            ok = torch.tensor(keep)[:, None]
            if score == "sigmoid":
                wts = torch.sigmoid(s) * ok
            else:
                wts = s.masked_fill(~ok, float("-inf")).softmax(0)
            out.append(torch.relu(torch.einsum("mn,mhw->nhw", wts, feats[top])))
    return torch.stack(out)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("backbone", ["toy", "r38"])
def test_scorecam_matches_naive_loop(score: str, backbone: str, r38: Classifier, x: torch.Tensor) -> None:
    if backbone == "toy":
        torch.manual_seed(3)
        model, m = Classifier(ToyBackbone(), NUM_CLASSES).eval(), 6  # includes the constant map
    else:
        model, m = r38, 7
    channels = torch.tensor([1, 4])
    expected = _naive_score_cam(model, x, channels, m, score)
    got = posthoc.score_cam(model, x, channels, batch_size=3, max_channels=m, score=score)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
    if backbone == "toy":  # the constant channel is among the scored ones yet has no influence
        torch.testing.assert_close(posthoc.score_cam(model, x, channels, max_channels=None, score=score),
                                   got, rtol=1e-5, atol=1e-7)


# -- references: pytorch_grad_cam --------------------------------------------------------------
class _Logits(nn.Module):
    """The classifier as pytorch_grad_cam expects it: ``x -> logits``."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]["parent"]


def _reference_maps(cls_name: str, model: Classifier, x: torch.Tensor, c: int) -> np.ndarray:
    """pytorch_grad_cam's map of class ``c`` for every image, at feature resolution.

    Its ``__call__`` upsamples and min-max normalises; we run it, then re-apply the step that
    precedes the upsampling (``get_cam_image`` on the recorded activations and gradients,
    followed by the same ReLU as ``compute_cam_per_layer``).
    """
    gradcam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = copy.deepcopy(model)  # it accumulates parameter gradients and leaves hooks until released
    targets = [ClassifierOutputTarget(c)] * x.shape[0]
    with getattr(gradcam, cls_name)(model=_Logits(model), target_layers=[model.backbone]) as cam:
        cam(input_tensor=x, targets=targets)
        record = cam.activations_and_grads
        acts, grads = record.activations[0].numpy(), record.gradients[0].numpy()
        raw = cam.get_cam_image(x, model.backbone, targets, acts, grads, False)
    return np.maximum(raw, 0)


# (pytorch_grad_cam class, ours, factor from our scale to the published one, head scale)
REFERENCES = {
    "gradcam": ("GradCAM", posthoc.grad_cam, "1/hw", 1.0),
    "layercam": ("LayerCAM", posthoc.layer_cam, "1/hw", 1.0),
    # pytorch_grad_cam adds eps=1e-6 to alpha's denominator 2g^2 + S g^3.  The gradient of a GAP
    # logit is ~w/(h*w) ~ 1e-3, so g^2 ~ 1e-6 and that eps changes the map by ~50 %; scaling the
    # head by 1000 makes it negligible (the remaining difference is O(eps / g^2)).
    "gradcampp": ("GradCAMPlusPlus", posthoc.grad_cam_pp, "1", 1000.0),
}
TOLERANCE = {"gradcam": 1e-5, "layercam": 1e-5, "gradcampp": 1e-4}  # of the map's max


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_matches_pytorch_grad_cam(method: str, model: Classifier, x: torch.Tensor) -> None:
    cls_name, fn, factor, head_scale = REFERENCES[method]
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.heads["parent"].weight.mul_(head_scale)
    ours = fn(model, x, ALL).numpy()
    h, w = ours.shape[-2:]
    if factor == "1/hw":
        ours = ours / (h * w)
    for c in range(NUM_CLASSES):
        ref = _reference_maps(cls_name, model, x, c)
        assert ref.shape == ours[:, c].shape
        scale = max(float(ref.max()), 1e-12)
        err = np.abs(ours[:, c] - ref).max() / scale
        assert err < TOLERANCE[method], f"{method} class {c}: relative error {err:.2e}"
