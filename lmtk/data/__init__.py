"""Data: text sources -> tokenizer -> packed token cache -> batches."""
