"""Adapters that model sites ship for a base model: LoRA files (kohya, LyCORIS LoHa/LoKr, PEFT), merged into the
weights and taken out again bit for bit (`ldm.adapters.lora`)."""
