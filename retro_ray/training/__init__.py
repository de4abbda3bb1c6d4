"""Training: the Ray Train + DeepSpeed loop and the pretrain stage (``pretrain``), instruction data
and the instruct stage (``instruct``), and the prompt templates that tuning, evaluation and
serving all use (``prompts``). Imports retrieval and below."""
