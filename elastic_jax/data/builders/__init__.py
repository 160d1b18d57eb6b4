"""TFDS dataset builders for the local corpora: text files, GLUE TSV files, Python docs."""
