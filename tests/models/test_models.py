"""Contract tests for every registered model (segmentation_models.pytorch style), checkpoint IO,
the crop/stitch helpers of GoLo and the output maps."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nucleiflow.models import checkpoint
from nucleiflow.models.checkpoint import list_checkpoints, load_checkpoint, model_hash, save_checkpoint, storage_roundtrip
from nucleiflow.models.enhancement import EnhancedStudent, Enhancement, TwoStage
from nucleiflow.models import golo as golo_module
from nucleiflow.models.golo import GoLo, from_crops, to_crops
from nucleiflow.models.outputs import postprocess_method, to_maps
from nucleiflow.models.registry import MODELS, create_model
from nucleiflow.models.unet import UNet

# name -> (arch, small kwargs, input channels, documented outputs {head: channels})
CASES = {
    "unet": ("unet", dict(heads={"np": 2, "hv": 2}, base_channels=8, depth=3), 3,
             {"np": 2, "hv": 2}),
    "unet-se-group-transpose": ("unet", dict(heads={"mask": 1, "marker": 1, "tp": 0},
                                             base_channels=8, depth=2, se=True, norm="group",
                                             up="transpose"), 3, {"mask": 1, "marker": 1}),
    "golo": ("golo", dict(base_channels=8, depth=2, global_scale=0.5, crop=32, marker=True), 3,
             {"mask": 1, "coarse": 1, "marker": 1}),
    "golo-context-scaled": ("golo", dict(base_channels=8, depth=2, crop=24, context=8,
                                         local_scale=1.5), 3, {"mask": 1, "coarse": 1}),
    "golo-hv": ("golo", dict(base_channels=8, depth=2, crop=32, context=8, hv=True, marker=True), 3,
                {"np": 2, "hv": 2, "marker": 1, "coarse": 1}),
    "twostage": ("twostage", dict(stage1=dict(base_channels=8, depth=2)), 3,
                 {"mask": 1, "coarse": 1}),
    "student": ("student", dict(base_channels=8, depth=3, n_types=3), 3,
                {"np": 2, "hv": 2, "tp": 3}),
    "student-no-types": ("student", dict(base_channels=8, depth=2), 3, {"np": 2, "hv": 2}),
    "enhancement": ("enhancement", dict(), 4, {"mask": 1}),
    "student-enhanced": ("student-enhanced", dict(stage1=dict(base_channels=8, depth=2),
                                                  enhancement=dict(width=8), freeze_stage1=False), 3,
                         {"np": 2, "hv": 2, "coarse": 1}),
}


def build(case: str):
    arch, kwargs, c_in, expected = CASES[case]
    torch.manual_seed(0)
    return create_model(arch, **kwargs), c_in, expected


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_arch_is_covered():
    assert {arch for arch, *_ in CASES.values()} == set(MODELS)


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
@pytest.mark.parametrize("case", CASES)
def test_forward_gives_documented_outputs(case, size):
    model, c_in, expected = build(case)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, c_in, *size))
    assert {k: v.shape for k, v in out.items()} == {
        k: torch.Size((2, c, *size)) for k, c in expected.items()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert model.outputs == expected
    if size == (64, 64):
        print(f"\n{case}: {n_params(model):,} parameters")


@pytest.mark.parametrize("case", CASES)
def test_backward_reaches_every_parameter(case):
    model, c_in, _ = build(case)
    model.train()
    out = model(torch.rand(2, c_in, 64, 64))
    sum((v**2).mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


@pytest.mark.parametrize("case", CASES)
def test_save_load_gives_identical_outputs(case, tmp_path):
    arch, kwargs, c_in, _ = CASES[case]
    model, *_ = build(case)
    x = torch.rand(2, c_in, 64, 64)
    model.train()
    with torch.no_grad():
        model(x)  # moves BatchNorm running statistics off their defaults
    model.eval()
    with torch.no_grad():
        unrounded = model(x)
    storage_roundtrip(model)  # checkpoints store float16: what is stored is what comes back
    with torch.no_grad():
        before = model(x)
    assert any(not torch.equal(unrounded[k], before[k]) for k in before), "weights were rounded"
    folder = save_checkpoint(model, tmp_path / "ckpt", {"arch": arch, "kwargs": kwargs, "mpp": 0.5})
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    for where in (folder, folder / "model.json", str(folder)):
        loaded, card = load_checkpoint(where)
        assert not loaded.training
        assert card["arch"] == arch and card["mpp"] == 0.5 and card["outputs"] == model.outputs
        with torch.no_grad():
            after = loaded(x)
        assert after.keys() == before.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k


def test_unknown_arch_raises_key_error_listing_names():
    with pytest.raises(KeyError, match="golo.*student|valid"):
        create_model("segformer")


def test_unet_works_for_any_size_including_tiny():
    model = UNet(base_channels=4, depth=3).eval()
    for size in [(1, 1), (5, 7), (8, 8), (33, 17)]:
        with torch.no_grad():
            out = model(torch.rand(1, 3, *size))
        assert out["np"].shape == (1, 2, *size)


def test_unet_channels_last_matches_contiguous():
    model = UNet(base_channels=8, depth=2, se=True).eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        ref = model(x)["np"]
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl["np"], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["golo-context-scaled", "twostage", "student"])
def test_forward_under_autocast_and_channels_last(case):
    model, c_in, expected = build(case)
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(1, c_in, 40, 52).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    assert {k: v.shape[1:] for k, v in out.items()} == {
        k: (c, 40, 52) for k, c in expected.items()}


def test_enhancement_has_about_77k_weights():
    n = n_params(Enhancement())
    # 4->64 3x3, two 64->64 3x3, 64->1 1x1, each with a bias.
    assert n == (4 * 9 * 64 + 64) + 2 * (64 * 9 * 64 + 64) + (64 + 1) == 76_289
    print(f"\nEnhancement: {n:,} weights")


def test_enhanced_student_starts_as_its_student_and_trains_only_the_enhancement():
    from nucleiflow.models.student import Student

    torch.manual_seed(0)
    student = Student(base_channels=4, depth=2)
    student.train()
    student(torch.rand(2, 3, 32, 32))  # BatchNorm statistics off their defaults
    model = EnhancedStudent(stage1=dict(base_channels=4, depth=2), enhancement=dict(width=8))
    model.stage1.load_state_dict(student.state_dict())
    x = torch.rand(2, 3, 32, 32)
    student.eval()
    model.train()  # the frozen student stays in eval mode: same maps as the student alone
    with torch.no_grad():
        a, b = student(x), model(x)
    torch.testing.assert_close(torch.softmax(b["np"], 1), torch.softmax(a["np"], 1))
    assert torch.equal(b["hv"], a["hv"])
    bn = next(m for m in model.stage1.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # the zero-initialised last conv moves first, then the layers before it
        opt.zero_grad()
        out = model(x)
        (-out["np"][:, 1].mean()).backward()
        opt.step()
    assert torch.equal(bn.running_mean, stats)
    assert all(p.grad is None for p in model.stage1.parameters())
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after["hv"], a["hv"])
    assert (after["np"][:, 1] > b["np"][:, 1]).all()  # the refined logit went where the loss pushed


def test_twostage_set_stage_freezes_the_right_part():
    model = TwoStage(stage1=dict(base_channels=4, depth=2))
    x = torch.rand(2, 3, 32, 32)
    model.set_stage("stage2").train()
    assert not any(p.requires_grad for p in model.stage1.parameters())
    assert all(p.requires_grad for p in model.enhancement.parameters())
    assert not any(m.training for m in model.stage1.modules())  # frozen BN stays in eval
    bn = next(m for m in model.stage1.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    model(x)["mask"].mean().backward()
    assert torch.equal(bn.running_mean, stats)
    assert all(p.grad is None for p in model.stage1.parameters())
    assert all(p.grad is not None for p in model.enhancement.parameters())

    model.set_stage("stage1")
    assert all(p.requires_grad for p in model.stage1.parameters())
    assert not any(p.requires_grad for p in model.enhancement.parameters())
    assert bn.training
    model.set_stage("finetune")
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError):
        model.set_stage("stage3")


@pytest.mark.parametrize("size, crop, context", [((70, 90), 32, 8), ((64, 64), 64, 0),
                                                  ((5, 9), 4, 3), ((31, 33), 16, 20)])
def test_crops_stitch_back_to_the_input(size, crop, context):
    x = torch.arange(2 * 3 * size[0] * size[1], dtype=torch.float32).reshape(2, 3, *size) + 1
    crops, grid = to_crops(x, crop, context)
    assert grid == (math.ceil(size[0] / crop), math.ceil(size[1] / crop))
    assert crops.shape == (2 * grid[0] * grid[1], 3, crop + 2 * context, crop + 2 * context)
    assert torch.equal(from_crops(crops, grid, size, context), x)


def test_crop_context_ring_holds_neighbours_and_zeros_at_the_border():
    x = torch.arange(1, 1 + 8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8)
    crops, grid = to_crops(x, crop=4, context=2)
    assert grid == (2, 2) and crops.shape == (4, 1, 8, 8)
    # Top-left crop: rows/cols -2..5 of the image, zeros where they fall outside it.
    assert torch.equal(crops[0, 0, 2:, 2:], x[0, 0, :6, :6])
    assert crops[0, 0, :2].abs().sum() == 0 and crops[0, 0, :, :2].abs().sum() == 0
    # Bottom-right crop reaches back into its neighbours.
    assert torch.equal(crops[3, 0, :6, :6], x[0, 0, 2:, 2:])


@pytest.mark.parametrize("context", [0, 8])
def test_golo_local_stage_sees_neighbour_crops_only_with_context(context):
    torch.manual_seed(0)
    model = GoLo(base_channels=4, depth=2, crop=16, context=context).eval()
    with torch.no_grad():  # a constant coarse mask isolates the local stage
        model.global_net.heads["mask"].weight.zero_()
    x = torch.rand(1, 3, 32, 32)
    y = x.clone()
    y[..., :, 16:] = torch.rand(1, 3, 32, 16)  # change the right-hand crops only
    with torch.no_grad():
        a, b = model(x)["mask"], model(y)["mask"]
    left_changed = not torch.equal(a[..., :, :16], b[..., :, :16])
    assert left_changed == (context > 0)


def test_golo_local_scale_resizes_the_local_input():
    model = GoLo(base_channels=4, depth=2, crop=20, context=4, local_scale=2.24)
    seen = []
    model.local_net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(torch.rand(1, 3, 40, 50))
    assert seen == [torch.Size((6, 4, 63, 63))]  # 2x3 crops of 28 px, * 2.24 = 62.7 -> 63


def test_golo_runs_its_crops_in_chunks_in_eval_mode_only(monkeypatch):
    """In eval mode the local stage runs LOCAL_BATCH crops at a time (memory) with the same
    maps as all at once; in training mode all crops are one batch (BatchNorm statistics)."""
    torch.manual_seed(0)
    model = GoLo(base_channels=4, depth=2, crop=8, context=4, hv=True).eval()
    x = torch.rand(2, 3, 40, 40)  # 2 x 5 x 5 = 50 crops
    seen = []
    model.local_net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    monkeypatch.setattr(golo_module, "LOCAL_BATCH", 16)
    with torch.no_grad():
        chunked = model(x)
        assert seen == [16, 16, 16, 2]
        monkeypatch.setattr(golo_module, "LOCAL_BATCH", 64)
        whole = model(x)
    assert seen[4:] == [50]
    for name in ("np", "hv", "coarse"):
        assert torch.allclose(chunked[name], whole[name], atol=1e-6), name
    seen.clear()
    monkeypatch.setattr(golo_module, "LOCAL_BATCH", 16)
    model.train()(x)
    assert seen == [50]


def test_checkpoint_card_is_validated(tmp_path):
    model = Enhancement()
    with pytest.raises(ValueError, match="mpp"):
        save_checkpoint(model, tmp_path / "a", {"arch": "enhancement", "kwargs": {}})
    with pytest.raises(ValueError, match="does not match"):
        save_checkpoint(model, tmp_path / "b", {"arch": "unet", "kwargs": {}, "mpp": 0.5})
    assert not (tmp_path / "a" / "model.json").exists()


def test_checkpoint_card_is_stored_as_given_with_defaults(tmp_path):
    model = UNet(heads={"mask": 1, "marker": 1}, base_channels=4, depth=1)
    card = {"arch": "unet", "kwargs": {"heads": {"mask": 1, "marker": 1}, "base_channels": 4,
                                       "depth": 1}, "mpp": 0.25, "metrics": {"dice": 0.8}}
    folder = save_checkpoint(model, tmp_path / "use-net", card)
    stored = json.loads((folder / "model.json").read_text())
    assert stored["metrics"] == {"dice": 0.8} and stored["name"] == "use-net"
    assert stored["postprocess"] == {"method": "marker"}
    assert "name" not in card  # the caller's dict is left alone


def test_model_hash_follows_the_weights(tmp_path):
    model = Enhancement()
    card = {"arch": "enhancement", "kwargs": {}, "mpp": 0.5}
    h1 = model_hash(save_checkpoint(model, tmp_path / "a", card))
    assert h1 == model_hash(save_checkpoint(model, tmp_path / "b", card))
    assert len(h1) == 16 and int(h1, 16) >= 0
    with torch.no_grad():
        model.net[0].bias.add_(1)
    assert model_hash(save_checkpoint(model, tmp_path / "a", card)) != h1


def test_model_hash_follows_the_post_processing_not_the_metrics(tmp_path):
    """Re-tuned thresholds change every output: done slides must not count as done."""
    model = Enhancement()
    card = {"arch": "enhancement", "kwargs": {}, "mpp": 0.5, "postprocess": {"method": "hv"}}
    h1 = model_hash(save_checkpoint(model, tmp_path / "a", card))
    assert model_hash(save_checkpoint(model, tmp_path / "b", {**card, "metrics": {"aji": 0.6}})) == h1
    tuned = {**card, "postprocess": {"method": "hv", "min_mean_prob": 0.65}}
    assert model_hash(save_checkpoint(model, tmp_path / "c", tuned)) != h1


def test_bundled_checkpoints_load_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "BUNDLED", tmp_path)
    assert list_checkpoints() == []
    with pytest.raises(KeyError, match="path"):
        load_checkpoint("tiny")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere" / "model.json")
    save_checkpoint(Enhancement(), tmp_path / "tiny", {"arch": "enhancement", "kwargs": {}, "mpp": 1})
    model, card = load_checkpoint("tiny")
    assert isinstance(model, Enhancement) and card["name"] == "tiny"
    assert [c["path"] for c in list_checkpoints()] == [str(tmp_path / "tiny")]


def test_to_maps_turns_logits_into_probabilities():
    out = {"np": torch.tensor([0.0, math.log(3)]).reshape(1, 2, 1, 1),
           "hv": torch.full((1, 2, 1, 1), 0.5), "marker": torch.zeros(1, 1, 1, 1),
           "tp": torch.tensor([0.0, math.log(3)]).reshape(1, 2, 1, 1)}
    maps = to_maps(out)
    assert set(maps) == {"prob", "hv", "marker", "type_prob"}
    assert maps["prob"].item() == pytest.approx(0.75)
    assert maps["marker"].item() == 0.5
    torch.testing.assert_close(maps["type_prob"].flatten(), torch.tensor([0.25, 0.75]))
    assert to_maps({"mask": torch.zeros(1, 1, 2, 2)})["prob"].eq(0.5).all()
    with pytest.raises(KeyError):
        to_maps({"hv": torch.zeros(1, 2, 1, 1)})


def test_postprocess_method_follows_the_outputs():
    assert postprocess_method(["np", "hv", "tp"]) == "hv"
    assert postprocess_method({"mask": 1, "coarse": 1, "marker": 1}) == "marker"
    assert postprocess_method(["mask", "coarse"]) == "distance"
