"""Utility and privacy evaluation of synthetic notes and DP coders.

    python eval/evaluate.py coders --real notes.jsonl --synthetic runs/demo/eps_8/synthetic/notes.jsonl
    python eval/evaluate.py dp-classifier --real notes.jsonl --epsilons 1,8,inf
    python eval/evaluate.py privacy --model runs/demo/eps_8/merged --real notes.jsonl
    python eval/evaluate.py fidelity --real notes.jsonl --synthetic runs/demo/eps_8/synthetic/notes.jsonl
"""
import sys

from dpnotes.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
