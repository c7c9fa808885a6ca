"""The `landscape` command: a thin layer over `sparse_training` and `landscape`."""
