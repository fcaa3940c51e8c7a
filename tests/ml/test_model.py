"""ml.model: timm construction and the offline ImageNet weight mapping."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from ml import model as models
from ml.decision import DecisionPolicy
from ml.entry import save_entry
from ml.labels import NUM_CLASSES
from ml.predictor import Predictor

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's bundled photograph of Grace Hopper


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    net = models.create(models.DEFAULT_ARCH, 1000)
    net.load_state_dict(models.map_state_dict(models.imagenet_state_dict(), net.state_dict()))
    return net.eval()


def test_mapped_imagenet_weights_classify_an_imagenet_photo(imagenet_lite0: torch.nn.Module) -> None:
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    prep = models.preprocessing_for(imagenet_lite0, (224, 224))
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0) - torch.tensor(prep.mean)) / torch.tensor(
        prep.std
    )
    with torch.inference_mode():
        probabilities = imagenet_lite0(x.permute(2, 0, 1)[None]).softmax(-1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM
    assert float(probabilities[MILITARY_UNIFORM]) > 0.3


def test_mapping_is_positional_and_complete(imagenet_lite0: torch.nn.Module) -> None:
    source = models.imagenet_state_dict()
    target = imagenet_lite0.state_dict()
    assert torch.equal(target["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(target["bn2.running_var"], source["_bn1.running_var"])
    assert torch.equal(target["classifier.weight"], source["_fc.weight"])


def test_shifted_state_dict_is_refused() -> None:
    source = models.imagenet_state_dict()
    target = models.create(models.DEFAULT_ARCH, 1000).state_dict()
    shifted = dict(list(source.items())[1:] + list(source.items())[:1])
    with pytest.raises(models.WeightMappingError):
        models.map_state_dict(shifted, target)


def test_wrong_shape_is_refused() -> None:
    source = dict(models.imagenet_state_dict())
    source["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(models.WeightMappingError, match="shape"):
        models.map_state_dict(source, models.create(models.DEFAULT_ARCH, 1000).state_dict())


def test_missing_tensor_is_refused() -> None:
    source = dict(models.imagenet_state_dict())
    source.pop("_fc.bias")
    with pytest.raises(models.WeightMappingError, match="tensors"):
        models.map_state_dict(source, models.create(models.DEFAULT_ARCH, 1000).state_dict())


def test_training_build_has_imagenet_features_and_a_fresh_head() -> None:
    net = models.build(models.DEFAULT_ARCH, NUM_CLASSES, imagenet=True)
    assert net.get_classifier().out_features == NUM_CLASSES
    assert torch.equal(net.state_dict()["conv_stem.weight"], models.imagenet_state_dict()["_conv_stem.weight"])


def test_other_architectures_have_no_offline_imagenet_weights() -> None:
    with pytest.raises(models.WeightMappingError, match="offline"):
        models.build("resnet18", NUM_CLASSES, imagenet=True)


def test_preprocessing_comes_from_the_timm_data_config() -> None:
    prep = models.preprocessing_for(models.create(models.DEFAULT_ARCH, NUM_CLASSES), (192, 192))
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5)
    assert models.Preprocessing.from_dict(prep.to_dict()) == prep


def test_logits_survive_a_save_and_load_round_trip(tmp_path: Path, fixture_pil: list[Image.Image]) -> None:
    net = models.build(models.DEFAULT_ARCH, NUM_CLASSES, imagenet=True).eval()
    prep = models.preprocessing_for(net, (128, 128))
    reference = Predictor(net, prep, DecisionPolicy(), device="cpu").logits(fixture_pil[:3])
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 0.05)):
        entry = save_entry(
            tmp_path / str(dtype),
            net,
            model_id="rt",
            architecture=models.DEFAULT_ARCH,
            preprocessing=prep,
            policy=DecisionPolicy(),
            dtype=dtype,
        )
        loaded = Predictor.load(entry, device="cpu").logits(fixture_pil[:3])
        np.testing.assert_allclose(loaded, reference, atol=tolerance)
