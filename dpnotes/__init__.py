"""dpnotes: DP fine-tuning of language models on clinical notes."""
