"""retro-ray: retrieval-augmented language models the InstructRetro way, on Ray.

The package is layered; a layer imports only the layers before it (``tests/test_layers.py``):

    model       the Retro decoder, chunked cross-attention and encoder; retro-fits; export (no Ray)
    core        typed config, storage, manifests, where everything lives, locks, runtime, errors
    database    corpus reading, tokenizer, chunks, the database's files, embeddings
    retrieval   the Faiss index (with ``index_actors/``), the neighbours stage, the retriever
    training    pretraining (Ray Train + DeepSpeed), instruction tuning, prompt templates
    serving     the engine (scheduler, runner, memory), generation, the OpenAI API, Serve
    evaluation  perplexity and QA, scoring, where the answers are
    (top)       ``pipeline`` (the stages in order), ``cli``, ``preflight``, ``plan``

The seven stages, each ``run(cfg, storage, force)`` writing one folder of the run
(``pipeline.STAGES``): ``tokenizer`` (``database.tokenizer``), ``db`` (``database.chunks``),
``index`` (``retrieval.index``), ``neighbors`` (``retrieval.neighbors``), ``pretrain``
(``training.pretrain``), ``instruct`` (``training.instruct``) and ``eval``
(``evaluation.evaluate``). The package itself imports nothing: ``retro_ray.model`` needs only
torch and transformers.
"""
