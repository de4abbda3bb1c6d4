"""The chunk database: reading corpora (``corpus``), the tokenizer stage (``tokenizer``), the db
stage that chunks and embeds in parallel (``chunks``), the database's files and readers
(``files``), the embedder and its actors (``embed``). Imports the core and the model layer."""
