"""Corpus ingestion: raw text files into a versioned table."""
