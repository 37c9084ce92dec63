"""lm-eval tasks shipped with tunelab (YAML + JSONL), found through TaskManager(include_path=this folder)."""
