"""The hallucination study's chapters: how it is measured (POPE, CHAIR), decoded against, caused and
cured. `python hallucination.py` runs the study; `python -m study.causes` and `python -m study.cures`
its later chapters."""
