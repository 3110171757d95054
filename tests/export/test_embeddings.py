"""Embedding files: exact tensors, string metadata, names users can type, atomic writes."""

import torch
from safetensors import safe_open

from conjure.export.embeddings import embedding_file_name, load_embedding, save_embedding
from conjure.export.modelspec import conjure_keys, modelspec
from conjure.families import SD1, SD2


def test_file_name_is_typeable():
    assert embedding_file_name("<my-style>") == "my-style.safetensors"
    assert embedding_file_name("my style/../x") == "my-style-..-x.safetensors"
    assert embedding_file_name("<>") == "embedding.safetensors"


def test_round_trip_exact_tensors_and_metadata(tmp_path):
    rows = torch.randn(2, 768)
    meta = modelspec(SD1, "textual-inversion", title="<t>", resolution=512, prediction_type="epsilon")
    meta |= conjure_keys(step=5, skipped=None)
    path = tmp_path / "t.safetensors"
    save_embedding(path, {"emb_params": rows}, meta)
    tensors, got = load_embedding(path)
    assert list(tensors) == ["emb_params"]
    assert torch.equal(tensors["emb_params"], rows)
    assert got["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert got["conjure.step"] == "5" and "conjure.skipped" not in got
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_sd2_architecture_names_follow_the_prediction_type():
    """The model spec's names (kohya sai_model_spec.py): 2.x-base is 512 epsilon, 2.x (768) predicts v."""
    def architecture(prediction_type):
        meta = modelspec(SD2, "textual-inversion", title="x", resolution=768, prediction_type=prediction_type)
        return meta["modelspec.architecture"]

    assert architecture("epsilon") == "stable-diffusion-v2-512/textual-inversion"
    assert architecture("v_prediction") == "stable-diffusion-v2-768-v/textual-inversion"


def test_saved_tensors_are_float32_contiguous(tmp_path):
    path = tmp_path / "t.safetensors"
    save_embedding(path, {"emb_params": torch.randn(4, 3).half().t()}, {})
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("emb_params").dtype == torch.float32
