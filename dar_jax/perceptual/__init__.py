"""Networks with their own weights that judge images for the tokenizer's training: LPIPS (VGG16 +
linear heads), DINOv2 ViT (REPA features) and the PatchGAN discriminator, each beside its
weight loader (the safe ``.pt`` reader; nothing is downloaded)."""
