"""The stage functions: media to features and visual tokens, few-shot prompts, generation and
scoring. Each reads records, adds its own fields and passes the rest through."""
