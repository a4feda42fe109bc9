"""dpldm: DP fine-tuning of latent diffusion models (DP-LDM attention blocks, DP-LoRA adapters) on dpkernels.

Stages: python -m dpldm.{pretrain_autoencoder,pretrain,train,sample,evaluate} --help
"""
