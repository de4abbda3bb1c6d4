"""Retrieval: the index stage over the sharded Faiss actors of ``index_actors/`` (``index``), the
neighbours stage and the samples training reads (``neighbors``), and the ``Retriever`` that
generation and serving ask (``retriever``: dense, BM25, fused). Imports the database and below."""
