"""The full-size text encoders the families share (each model's published text_encoder*/config.json)."""

from conjure.families.record import EncoderArchitecture, T5Architecture

CLIP_L = EncoderArchitecture(hidden=768, intermediate=3072, layers=12, heads=12, activation="quick_gelu",
                             projection_dim=768)
OPENCLIP_H = EncoderArchitecture(hidden=1024, intermediate=4096, layers=23, heads=16, activation="gelu",
                                 projection_dim=512)
OPENCLIP_BIGG = EncoderArchitecture(hidden=1280, intermediate=5120, layers=32, heads=20, activation="gelu",
                                    projection_dim=1280)

# FLUX.1's text_encoder_2: T5 v1.1 XXL, encoder only
T5_XXL = T5Architecture(d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64, vocab_size=32128)
