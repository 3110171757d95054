"""A trained run's files as they are shared (issue 24): the LoRA carries kohya's ss_* key set for the same
settings, each file's own hashes match its bytes, and no header names the run, data, model or home folders."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from safetensors import safe_open

# kohya-ss/sd-scripts train_network.py, commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16): the keys of
# `metadata` in train() (its branch for one data set without a data-set config), save_model's three and
# network.save_weights' two sshs_* (networks/lora.py), for a model given as a folder: ss_sd_model_hash and
# ss_new_sd_model_hash are written for a file only (os.path.exists), ss_vae_* with --vae only.
# Left out: ss_sd_scripts_commit_hash, sd-scripts' own git commit, which no conjure setting has.
KOHYA_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip",
    "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_training_comment", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_ip_noise_gamma",
    "ss_debiased_estimation", "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength", "ss_loss_type",
    "ss_huber_schedule", "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed",
    "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs", "ss_validate_every_n_steps",
    "ss_resize_interpolation",
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info", "ss_network_args", "ss_sd_model_name",
    "ss_training_finished_at", "ss_steps", "ss_epoch",
    "sshs_model_hash", "sshs_legacy_hash",
}


def _headers(folder: Path) -> dict[str, dict[str, str]]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[str(path.relative_to(folder))] = f.metadata() or {}
    return out


def _leaks(headers: dict[str, dict[str, str]], private: list[str]) -> list[str]:
    return [f"{name}: {key}" for name, meta in headers.items() for key, value in meta.items()
            if any(p in value for p in private)]


def test_a_trained_lora_has_kohyas_keys_its_hashes_and_no_folders(lora_config, run_config, image_folder, tmp_path):
    for i in range(6):
        (image_folder / f"{i}.txt").write_text("zwx, Red hat" if i % 2 else "zwx, smile")
    raw = lora_config(basic={"max_train_steps": 2, "save_every_n_steps": 2, "validate_every_n_steps": None},
                      validation={"at_start": False}, data={"caption_prefix": ""})
    result = run_config(raw)
    headers = _headers(result.run_dir)
    meta = headers["checkpoints/step-000002/run.safetensors"]
    assert {k for k in meta if k.startswith(("ss_", "sshs_"))} == KOHYA_KEYS
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 6}}
    assert json.loads(meta["ss_tag_frequency"]) == {"images": {"zwx": 6, "red hat": 3, "smile": 3}}
    assert meta["ss_sd_model_name"] == Path(raw["basic"]["base_model"]).name == meta["conjure.base_model"]
    assert meta["modelspec.trigger_phrase"] == "zwx" and "6 images" in meta["modelspec.description"]
    raw_bytes = (result.run_dir / "checkpoints/step-000002/run.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw_bytes[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw_bytes[8 + n:]).hexdigest()
    private = [str(tmp_path), str(Path.home()), str(image_folder), raw["basic"]["base_model"]]
    assert _leaks(headers, private) == []


def test_pivotal_files_name_no_folders_and_minimal_leaves_the_record_out(pivotal_config, run_config, tmp_path):
    raw = pivotal_config(basic={"max_train_steps": 1, "save_every_n_steps": 1},
                         textual_inversion={"bundle": True}, export={"metadata": "minimal"})
    result = run_config(raw)
    headers = _headers(result.run_dir)
    assert len(headers) == 3  # the LoRA, its embedding, the bundle
    assert _leaks(headers, [str(tmp_path), str(Path.home())]) == []
    for meta in headers.values():
        assert "modelspec.hash_sha256" in meta and "conjure.base_model" not in meta
        assert not any(k.startswith("ss_") and k not in ("ss_v2", "ss_base_model_version", "ss_network_module",
                                                          "ss_network_dim", "ss_network_alpha", "ss_network_args",
                                                          "ss_output_name") for k in meta)
