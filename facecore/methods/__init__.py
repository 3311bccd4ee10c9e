"""The four inference procedures, batch-first tensors in and out."""
