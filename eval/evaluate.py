"""Utility and privacy evaluation of synthetic notes and DP coders (`--help` after a subcommand lists its settings).

    python eval/evaluate.py coders --config eval/configs/coders.yaml synthetic=runs/demo/eps_8/synthetic/notes.jsonl
    python eval/evaluate.py dp-classifier --config eval/configs/dp_classifier.yaml
    python eval/evaluate.py privacy model=runs/demo/eps_8/merged canaries_from=notes.jsonl
    python eval/evaluate.py fidelity real=notes.jsonl synthetic=runs/demo/eps_8/synthetic/notes.jsonl
"""
from dpnotes.evaluation.cli import main

if __name__ == "__main__":
    main()
