"""Corpus: fetch real text offline, extract, clean, balance and split it per language."""
