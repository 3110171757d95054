"""LoRA target presets of the SD UNets (diffusers module paths), shared by SD 1.x, 2.x and SDXL."""

ATTENTION = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
FEED_FORWARD = r"\.(ff\.net\.0\.proj|ff\.net\.2)$|attentions\.\d+\.(proj_in|proj_out)$"
RESNET_ETC = r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)$|(downsamplers|upsamplers)\.0\.conv$"

# "attention_ff" is kohya's default set (networks/lora.py UNET_TARGET_REPLACE_MODULE: the transformer blocks);
# "all" adds the ResNets and samplers (LoCon, kohya's conv_dim).
UNET_PRESETS = (
    ("attention", (ATTENTION,)),
    ("attention_ff", (ATTENTION, FEED_FORWARD)),
    ("all", (ATTENTION, FEED_FORWARD, RESNET_ETC)),
)
