"""Text tokenizer loading and prompt formats."""
