"""The embedded base model's training corpus: fact tables and the deterministic text generator.

``facts.py`` holds the tables (the one copy, shared with ``data/raw/make_sample.py``);
``generate.py`` writes ``loraflow/model/corpus/*.txt`` from them. All of it is original text written
for this project and dedicated to the public domain (CC0 1.0).
"""
