from conftest import tiny_config

from retro_ray.core.storage import Storage
from retro_ray.database import tokenizer
from retro_ray.database.embed import default_model_path


def test_trained_bpe_is_saved_under_the_run_and_reloads(ray_local, tmp_path, wiki_parquet, wiki_docs):
    cfg = tiny_config(tmp_path / "run", wiki_parquet)
    storage = Storage()
    out = tokenizer.run(cfg, storage)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    tok = tokenizer.load_run_tokenizer(cfg, storage)
    assert len(tok) == 512 and tok.eos_token == "<|endoftext|>"
    text = wiki_docs[3]["text"]
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    assert storage.read_json(out + "/_manifest.json")["counts"]["docs"] == len(wiki_docs)


def test_pretrained_tokenizer_from_a_local_folder(tmp_path):
    tok = tokenizer.load_pretrained(default_model_path())
    assert tok.is_fast and tok("retrieval")["input_ids"][0] == tok.cls_token_id
