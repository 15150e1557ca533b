"""imtune's masks and weights inside other trainers. `imtune.integrations.hf`: transformers' Trainer (and what TRL's
SFTTrainer can take of them)."""
