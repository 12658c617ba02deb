"""Ready-made experts and eval data: the tiny character-level demo and SmolLM2-135M."""
