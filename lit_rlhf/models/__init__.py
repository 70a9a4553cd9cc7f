"""Models: loading (hub, local, packaged GGUF), forward helpers, scalar reward/value models, frozen trunks, LoRA, sharding."""
