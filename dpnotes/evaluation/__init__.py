"""Utility and privacy evaluation of synthetic notes.

metrics        multi-label F1 (dev-tuned global threshold), P@k, AUC, per-label table, bootstrap CIs
coders         TF-IDF and HF-encoder coders (mean-pool / label-attention heads), `evaluate_coder`,
               `compare_train_sets` (real / synthetic / real+synthetic, scored on real test notes)
dp_classifier  DP-LoRA encoder classifier via dpnotes.privacy.engine, `dp_epsilon_sweep`
privacy        canary exposure, loss-based membership inference, verbatim leakage, one-run ε audit
fidelity       embedding Fréchet distance / mean cosine, code-distribution TV / JS, text statistics
cli            `python -m dpnotes.evaluation.cli {coders,dp-classifier,privacy,fidelity}`
"""
