"""`conjure inspect`'s sharing table: the training record kohya's keys hold, as lines a person reads."""

from __future__ import annotations

import json

from conjure.inspection.sharing import sharing_lines


def test_the_record_reads_as_a_table():
    meta = {
        "ss_sd_model_name": "v1-5.safetensors", "ss_new_sd_model_hash": "ab" * 32, "ss_sd_model_hash": "1234abcd",
        "ss_training_started_at": "0", "ss_training_finished_at": "90.5", "ss_steps": "6", "ss_epoch": "2",
        "ss_num_epochs": "2", "ss_dataset_dirs": json.dumps({"hats": {"n_repeats": 2, "img_count": 6}}),
        "ss_tag_frequency": json.dumps({"hats": {"zwx": 6, "red hat": 4}, "more": {"red hat": 1}}),
        "ss_total_batch_size": "4", "ss_learning_rate": "0.0001", "ss_text_encoder_lr": "None",
        "modelspec.trigger_phrase": "zwx", "sshs_legacy_hash": "e3b0c442",
    }
    assert sharing_lines(meta) == [
        "sharing",
        f"  base model   v1-5.safetensors (sha256 {'ab' * 32}, legacy 1234abcd)",
        "  trained      1970-01-01 00:00:00 UTC to 1970-01-01 00:01:30 UTC, 6 steps, epoch 2 of 2",
        "  data         hats (6 images x 2); tags zwx (6), red hat (5)",
        "  settings     batch 4, lr 0.0001",
        "  trigger      zwx",
        "  hashes       sshs_legacy_hash e3b0c442",
    ]


def test_another_tools_malformed_values_lose_their_line_only():
    meta = {"ss_dataset_dirs": "{not json", "ss_tag_frequency": "[1]", "ss_training_started_at": "soon",
            "modelspec.description": "d"}
    assert sharing_lines(meta) == ["sharing", "  trained      ? to ?, ? steps, epoch ? of ?", "  description  d"]
    assert sharing_lines({"conjure.version": "0.1.0"}) == []
