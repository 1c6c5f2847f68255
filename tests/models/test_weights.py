"""Pretrained weights: real files offline, safe loading, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import RunsCode, share_seeing_ants_or_bees
from thaw import ThawError, build_model
from thaw.models.weights import packaged_copy


def test_real_mobilenet_weights_recognise_ants_and_bees(torch_home: Path) -> None:
    """The real IMAGENET1K_V1 file, with its own preprocessing, sees ants and bees in the val photos."""
    assert share_seeing_ants_or_bees(build_model("mobilenet_v2", weights="IMAGENET1K_V1")) > 0.8


def test_packaged_weights_land_in_the_hub_cache_torchvision_reads(torch_home: Path) -> None:
    shipped = packaged_copy("mobilenet_v2-b0353104.pth")
    assert shipped is not None and shipped.is_file()
    build_model("mobilenet_v2", weights="IMAGENET1K_V1", num_classes=2)
    cached = torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert cached.resolve() == shipped.resolve()


def test_missing_weights_offline_say_which_file_and_where(torch_home: Path) -> None:
    # resnet18's file is neither cached nor shipped here, and this machine cannot download it.
    with pytest.raises(ThawError) as error:
        build_model("resnet18", weights="IMAGENET1K_V1")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(torch_home / "hub" / "checkpoints") in message
    assert "--weights PATH" in message and "\n" not in message


def test_a_first_download_into_a_fresh_hub_cache_lands_there(torch_home: Path, tmp_path: Path) -> None:
    """The download path a user online takes, over a file:// URL: torch writes into the cache's folder, which a
    first use of torch hub has not made yet (that failed with "No such file or directory")."""
    from thaw.models.weights import ensure_cached

    published = tmp_path / "published" / "tiny-0123abcd.pth"
    published.parent.mkdir()
    torch.save({"weight": torch.arange(6.0)}, published)
    assert not torch_home.exists()
    cached = ensure_cached(published.as_uri())
    assert cached == torch_home / "hub" / "checkpoints" / "tiny-0123abcd.pth"
    assert cached.read_bytes() == published.read_bytes()
    published.unlink()
    assert ensure_cached(published.as_uri()) == cached  # the second use reads the cache: the source is gone


@pytest.mark.parametrize("packaged", [False, True], ids=["download", "offline-package"])
def test_a_hub_cache_that_cannot_be_made_is_one_line(torch_home: Path, packaged: bool) -> None:
    from torchvision.models import MobileNet_V2_Weights, ResNet18_Weights

    from thaw.models.weights import ensure_cached

    assert packaged_copy("mobilenet_v2-b0353104.pth") is not None  # the offline-package case takes the packaged path
    torch_home.mkdir()
    (torch_home / "hub").write_text("a file where the cache folder goes")
    url = (MobileNet_V2_Weights if packaged else ResNet18_Weights).IMAGENET1K_V1.url  # mobilenet_v2's file ships in a package
    with pytest.raises(ThawError) as refused:
        ensure_cached(url)
    message = str(refused.value)
    assert message.startswith(f"cannot use the torch hub cache {torch_home / 'hub' / 'checkpoints'} (") and "\n" not in message
    assert message.endswith("set TORCH_HOME to a folder you can write, or pass a local file (weights=PATH, --weights PATH)")


def test_unknown_weights_name_lists_the_valid_ones() -> None:
    with pytest.raises(ThawError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        build_model("resnet50", weights="IMAGENET2K", device="meta")


def test_local_state_dict_file_loads_by_path(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model("mobilenet_v3_small")
    path = tmp_path / "mine.pth"
    torch.save(source.model.state_dict(), path)
    loaded = build_model("mobilenet_v3_small", weights=str(path), num_classes=3)
    original = source.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        if not name.startswith("classifier.3"):
            assert torch.equal(tensor, original[name]), name
    assert loaded.num_classes == 3


def test_a_weights_file_of_another_ending_loads_by_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--weights sd.ckpt` (Lightning's ending) was refused as an unknown weights name: "choose ... a file path"
    source = build_model("mobilenet_v3_small")
    torch.save(source.model.state_dict(), tmp_path / "sd.ckpt")
    for name in ("DEFAULT", "none"):  # a file named like a weights name, or none, does not shadow it
        torch.save({}, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    loaded = build_model("mobilenet_v3_small", weights="sd.ckpt", num_classes=3)
    assert torch.equal(loaded.model.features[0][0].weight, source.model.features[0][0].weight)
    assert "MobileNet_V3_Small_Weights" in build_model("mobilenet_v3_small", weights="DEFAULT", device="meta").preprocessing.source
    assert "no weights loaded" in build_model("mobilenet_v3_small", weights="none", device="meta").preprocessing.source


def test_a_run_folder_as_weights_says_how_to_continue_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thaw.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for given in (str(tmp_path / "run"), "run"):  # a bare name in the current folder too: it was "has no weights 'run'"
        with pytest.raises(ThawError, match=rf"^weights {given} is a thaw run, not a weights file: `thaw train --resume {given}` continues it; "
                           rf"a new run starts from its weights with --weights {given}/model.safetensors \(its head is kept for the same classes in the same order, else a new one is trained\)$"):
            build_model("mobilenet_v3_small", weights=given)


def test_safetensors_file_loads_by_path(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build_model("squeezenet1_1")
    path = tmp_path / "squeeze.safetensors"
    save_file(source.model.state_dict(), str(path))
    loaded = build_model("squeezenet1_1", weights=str(path))
    assert torch.equal(loaded.model.features[0].weight, source.model.features[0].weight)


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(build_model("squeezenet1_1").model.state_dict(), path)
    with pytest.raises(ThawError, match="do not fit MobileNetV3"):
        build_model("mobilenet_v3_small", weights=str(path))


def test_file_whose_hash_does_not_match_its_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ThawError, match="damaged or not the file its name says"):
        build_model("mobilenet_v2", weights=str(path))


@pytest.mark.parametrize("name", ["epoch-000120.pth", "squeeze-deadbeef.pth"])
def test_a_name_with_hex_digits_that_is_no_torchvision_file_is_not_hash_checked(tmp_path: Path, name: str) -> None:
    source = build_model("squeezenet1_1")
    path = tmp_path / name
    torch.save(source.model.state_dict(), path)
    loaded = build_model("squeezenet1_1", weights=str(path))
    assert torch.equal(loaded.model.features[0].weight, source.model.features[0].weight)


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": RunsCode()}, path)
    with pytest.raises(ThawError, match=r"^cannot load .*evil.pth safely: Trying to load unsupported GLOBAL .* whose module .* is blocked; "
                       r"thaw loads only tensors \(weights_only=True\) - save a state_dict or use safetensors$"):
        build_model("mobilenet_v3_small", weights=str(path))


@pytest.mark.parametrize("content", ["damaged safetensors", "empty state dict", "numbered keys", "zero bytes", "cut short", "other bytes"])
def test_a_weights_file_without_named_tensors_is_one_line(tmp_path: Path, content: str) -> None:
    """A broken download is said to be damaged: the advice for an unsafe pickle (save a state_dict) would mislead."""
    damaged = r"; download or save it again( \(timm: .*\))?$"  # timm's own reader's reason after thaw's
    if content == "zero bytes":  # torch's error for it has no message at all
        path = tmp_path / "zero.pth"
        path.write_bytes(b"")
        expected = r"^cannot read .*zero.pth: it is damaged, cut short or no torch file \(an empty file\)" + damaged
    elif content == "cut short":  # a download that stopped half-way
        path = tmp_path / "cut.pth"
        torch.save(build_model("mobilenet_v3_small", weights=None).model.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = r"^cannot read .*cut.pth: it is damaged, cut short or no torch file \(.*\)" + damaged
    elif content == "other bytes":  # torch's paragraph on weights_only is left out: its reason is what is said
        path = tmp_path / "noise.pth"
        path.write_bytes(bytes(range(45, 256)) * 20)
        expected = r"^cannot read .*noise.pth: it is damaged, cut short or no torch file \(Unsupported operand 45\)" + damaged
    elif content == "damaged safetensors":
        path = tmp_path / "cut.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        expected = "cannot read .* as safetensors"
    else:
        path = tmp_path / "odd.pth"
        torch.save({} if content == "empty state dict" else {0: torch.zeros(1)}, path)
        expected = "holds no state_dict of named tensors"
    for model in ("mobilenet_v3_small", "timm/resnet18"):
        with pytest.raises(ThawError, match=expected):
            build_model(model, weights=str(path))


@pytest.mark.parametrize("model", ["resnet18", "timm/resnet18"])
def test_missing_weights_file_path(model: str, tmp_path: Path) -> None:
    with pytest.raises(ThawError, match="does not exist"):
        build_model(model, weights="/nonexistent/resnet.pth", device="cpu")
    with pytest.raises(ThawError, match="is a folder; pass the .pth/.pt/.safetensors file inside it"):
        build_model(model, weights=str(tmp_path), device="cpu")


def _link_when_all_are_ready(barrier, url: str, results) -> None:
    from thaw.models.weights import ensure_cached

    barrier.wait()
    try:
        results.put(str(ensure_cached(url).resolve()))
    except Exception as error:  # noqa: BLE001 - the parent reports what failed
        results.put(f"{type(error).__name__}: {error}")


def test_processes_linking_the_packaged_weights_at_once_all_succeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's ranks on a first offline run each put the packaged file in one fresh hub cache at the same moment."""
    import multiprocessing

    from torchvision.models import MobileNet_V2_Weights

    shipped = packaged_copy("mobilenet_v2-b0353104.pth")
    assert shipped is not None
    context, processes = multiprocessing.get_context("fork"), 8
    for attempt in range(10):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / f"home{attempt}"))
        barrier, results = context.Barrier(processes), context.Queue()
        workers = [context.Process(target=_link_when_all_are_ready, args=(barrier, MobileNet_V2_Weights.IMAGENET1K_V1.url, results))
                   for _ in range(processes)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert outcomes == [str(shipped.resolve())] * processes, outcomes


@pytest.mark.parametrize("weights", ["", "  "])
def test_empty_weights_are_refused_not_read_as_none(weights: str) -> None:
    """An unset variable (`weights=os.environ.get("W", "")`) trained from random weights without a word."""
    with pytest.raises(ThawError, match="weights is an empty string"):
        build_model("mobilenet_v3_small", weights=weights)


@pytest.mark.parametrize("packaged", [False, True], ids=["download", "offline-package"])
def test_a_folder_where_the_weights_file_goes_is_one_line(torch_home: Path, tmp_path: Path, packaged: bool) -> None:
    from torchvision.models import MobileNet_V2_Weights

    from thaw.models.weights import ensure_cached

    assert packaged_copy("mobilenet_v2-b0353104.pth") is not None  # the offline-package case takes the packaged path
    published = tmp_path / "published" / "tiny-0123abcd.pth"
    published.parent.mkdir()
    torch.save({"weight": torch.arange(6.0)}, published)
    url = MobileNet_V2_Weights.IMAGENET1K_V1.url if packaged else published.as_uri()
    blocking = torch_home / "hub" / "checkpoints" / Path(url).name
    (blocking / "inside").mkdir(parents=True)
    with pytest.raises(ThawError, match=f"^cannot put {Path(url).name} into the torch hub cache {blocking.parent} \\("):
        ensure_cached(url)
    assert sorted(path.name for path in blocking.parent.iterdir()) == [blocking.name]  # no link or download left behind
    assert [path.name for path in blocking.iterdir()] == ["inside"]


@pytest.mark.parametrize("name", ["theirs.pth", "model.safetensors"])
def test_a_weights_file_that_cannot_be_read_is_not_called_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """No permission to read it, or a disk error: "damaged, download it again" (torch) or "no such file" (safetensors)
    would send the user the wrong way. (Tests run as root, whom file modes do not stop: the refusal is simulated.)"""
    from safetensors.torch import save_file

    path = tmp_path / name
    state = build_model("mobilenet_v3_small", weights=None).model.state_dict()
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    real_open = Path.open

    def refused(self: Path, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
    with pytest.raises(ThawError, match=rf"^cannot read .*{name}: Permission denied$"):
        build_model("mobilenet_v3_small", weights=str(path))


def test_an_exported_model_given_as_weights_is_named_for_what_it_is(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """`thaw export`'s model.pt (TorchScript) or model.onnx given as --weights was called damaged, after a torch warning."""
    model = build_model("mobilenet_v3_small", weights=None).model.eval()
    scripted = tmp_path / "model.pt"
    torch.jit.trace(model, torch.zeros(1, 3, 32, 32)).save(str(scripted))
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x09")  # the suffix says it: the bytes are not read
    for path, kind in ((scripted, "a TorchScript model"), (onnx_file, "an ONNX model")):
        with pytest.raises(ThawError, match=rf"^{path} is {kind} \(as thaw export writes\), not a weights file; pass the weights it "
                           r"came from, such as a run's model.safetensors, or a state_dict saved with torch.save$"):
            build_model("mobilenet_v3_small", weights=str(path))
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]
    from thaw.cli import main

    assert main(["convert-weights", str(scripted), "--model", "mobilenet_v3_small", "--out", str(tmp_path / "w.safetensors")]) == 2
    assert not (tmp_path / "w.safetensors").exists()
    plain = tmp_path / "plain.pt"  # a state dict is a zip too, without TorchScript's constants
    torch.save(model.state_dict(), plain)
    assert build_model("mobilenet_v3_small", weights=str(plain)).model is not None
