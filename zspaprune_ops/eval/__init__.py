"""``zspaprune eval``: answer accuracy against kept visual tokens, per selection method.

``methods`` (what picks the kept tokens), ``data`` (the questions: the shapes world or a JSONL
file), ``run`` (the evaluation and its rows), ``report`` (table and plot). Demo / eval code:
the library does not import it.
"""
