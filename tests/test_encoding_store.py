"""analyze reads encodings lazily: the same tables as from tensors in memory, and at most a few tensors
held at once, however many models were encoded."""

import numpy as np
import pytest
import torch

from tests.test_analysis import LANGS, TOKENS, analyzed, encodings
from xlsub import artifacts
from xlsub.report.analysis import AnalysisInputs
from xlsub.report.similarity_tables import Counts

COUNTS = Counts(full=20, controls=20, subnetworks=10, length=10, power_draws=10)


def stored(tmp_path, enc):
    for key, langs in enc.items():
        for lang, x in langs.items():
            artifacts.write_encodings(tmp_path, key, lang, x, "float32")
    return artifacts.read_encodings(tmp_path / artifacts.ENCODINGS_DIR)


def run(enc):
    return analyzed(AnalysisInputs(languages=LANGS, encodings=enc, tokens=TOKENS), counts=COUNTS, bootstrap=50, permutations=50)


def test_store_reads_on_demand_and_drops_the_least_recently_used(tmp_path):
    store = stored(tmp_path, encodings())
    assert set(store) == {"full", "en-s0", "de-s0", "zh-s0", "random", "base"} and store.loads == 0
    assert set(store["full"]) == set(LANGS)
    x = store["full"]["de"]
    assert torch.equal(x, encodings()["full"]["de"].float()) and store.loads == 1
    assert store["full"]["de"] is x and store.loads == 1  # cached
    for lang in ("en", "zh", "en"):
        store["base"][lang]
    assert store.loads == 3
    store["full"]["de"]  # still one of the three most recent
    assert store.loads == 3
    store["random"]["de"]  # a fourth tensor: the least recently used one (base/zh) goes
    assert store.loads == 4
    store["full"]["de"], store["base"]["en"]
    assert store.loads == 4
    store["base"]["zh"]
    assert store.loads == 5
    with pytest.raises(KeyError):
        store["full"]["fr"]


def test_analyze_from_the_store_equals_analyze_in_memory(tmp_path):
    in_memory = run({k: {l: x.float() for l, x in v.items()} for k, v in encodings().items()})
    lazy = run(stored(tmp_path, encodings()))
    assert set(lazy.tables) == set(in_memory.tables)
    for name, table in in_memory.tables.items():
        a, b = table.select_dtypes("number").to_numpy(), lazy.tables[name].select_dtypes("number").to_numpy()
        assert np.allclose(a, b, equal_nan=True), name


def test_encodings_held_at_once_do_not_grow_with_the_number_of_models(tmp_path):
    few = stored(tmp_path / "few", encodings(seeds=(0,)))
    many = stored(tmp_path / "many", encodings(seeds=(0, 1, 2, 3)))
    run(few), run(many)
    one = next(iter(few["full"].values())).numel() * 4
    assert len(many) == len(few) + 9
    assert many.loads > few.loads
    assert many.peak_live_bytes == few.peak_live_bytes
    # all languages of one model (the language x language CKA) plus the cache: never two models' worth
    assert many.peak_live_bytes <= (len(LANGS) + many.resident) * one


def test_float16_storage_changes_cka_by_less_than_1e3_at_base_width():
    """`dtype=auto` stores base-width encodings in float16: measure what that does to CKA."""
    import transformers

    from xlsub.data.parallel import load_parallel
    from xlsub.models import loading as models
    from xlsub.models.encoding import encode
    from xlsub.similarity.cka import cka_matrix

    assert artifacts.storage_dtype("auto", 768) == "float16" and artifacts.storage_dtype("auto", 128) == "float32"
    assert artifacts.storage_dtype("float32", 768) == "float32"
    corpus = load_parallel("embedded", ["en", "de"], 100)
    tokenizer = models.train_tokenizer([t for lang in corpus.languages for t in corpus.texts[lang]], vocab_size=1000)
    transformers.set_seed(0)
    model = models.scratch_model(models.BASE_SHAPE, tokenizer, 32).eval()
    reps = {lang: encode(model, tokenizer, corpus.texts[lang], batch_size=50, pooling="mean") for lang in corpus.languages}
    half = {lang: x.half().float() for lang, x in reps.items()}
    for kind in ("linear", "debiased"):
        exact, rounded = cka_matrix(reps, kind), cka_matrix(half, kind)
        change = float((exact - rounded).abs().max())
        print(f"{kind}: largest CKA change from float16 storage {change:.2e}")
        assert 0 < change < 1e-3, kind


def test_last_layer_is_read_alone_and_cached_in_its_own_right(tmp_path):
    enc = encodings()
    store = stored(tmp_path, enc)
    whole = enc["full"]["de"].float()
    last = artifacts.last_layer(store["full"], "de")
    assert torch.equal(last, whole[-1]) and store.loads == 1
    assert store.live_bytes == last.numel() * 4  # one layer resident, not the file's layers+1
    assert torch.equal(artifacts.last_layer(store["full"], "de"), last) and store.loads == 1  # cached
    assert artifacts.layer_count(store["full"], "zh") == whole.shape[0] and store.loads == 1  # from the header
    store["base"]["en"]  # the whole tensor cached: its last layer is copied from it, not read again
    copied = artifacts.last_layer(store["base"], "en")
    assert torch.equal(copied, enc["base"]["en"].float()[-1]) and store.loads == 2
    assert copied.untyped_storage().data_ptr() != store["base"]["en"].untyped_storage().data_ptr()
    plain = {"de": whole}  # tensors in memory: indexed
    assert artifacts.last_layer(plain, "de") is not None and torch.equal(artifacts.last_layer(plain, "de"), whole[-1])
    assert artifacts.layer_count(plain, "de") == whole.shape[0]
    with pytest.raises(KeyError):
        artifacts.last_layer(store["full"], "fr")


def test_load_encodings_reads_one_layer_and_names_a_missing_one(tmp_path):
    x = torch.randn(4, 6, 3)
    artifacts.save_encodings(x, tmp_path / "e.safetensors")
    for layer in (0, 2, -1, -4):
        assert torch.equal(artifacts.load_encodings(tmp_path / "e.safetensors", layer=layer), x[layer])
    assert artifacts.encodings_shape(tmp_path / "e.safetensors") == [4, 6, 3]
    for layer in (4, -5):
        with pytest.raises(artifacts.XlsubError, match="4 hidden states, no layer"):
            artifacts.load_encodings(tmp_path / "e.safetensors", layer=layer)


def test_membership_reads_nothing(tmp_path):
    store = stored(tmp_path, encodings())
    assert "de" in store["full"] and "fr" not in store["full"] and "full" in store
    assert store.loads == 0


def test_self_terms_are_kept_by_the_store_and_computed_once_for_every_table(tmp_path, monkeypatch):
    """`self_terms` equals `self_hsic` of the stored tensor (all hidden states, or the last alone); a store computes
    each (model, language, kind) once, whichever table asks (the last one taken from all where those are known), a
    mapping in memory each time; over a whole analysis every kept term was computed exactly once."""
    from xlsub.report import tables
    from xlsub.similarity.cka import self_hsic

    calls = []

    def counted(x, kind, sigma_frac=1.0):
        calls.append(tuple(x.shape))
        return self_hsic(x, kind, sigma_frac)

    monkeypatch.setattr(tables, "self_hsic", counted)
    enc = encodings()
    store = stored(tmp_path / "one", enc)
    de, zh = enc["full"]["de"].float(), enc["full"]["zh"].float()
    whole = tables.self_terms(store["full"], "de", "debiased")
    assert torch.equal(whole, self_hsic(de, "debiased")) and len(calls) == 1
    assert tables.self_terms(store["full"], "de", "debiased") is whole and len(calls) == 1
    assert torch.equal(tables.self_terms(store["full"], "de", "debiased", last=True), whole[-1:]) and len(calls) == 1
    last = tables.self_terms(store["full"], "zh", "debiased", last=True)  # not known whole: the last layer alone
    assert torch.equal(last, self_hsic(zh[-1:], "debiased")) and calls[-1] == (1, *zh.shape[1:])
    assert not torch.equal(tables.self_terms(store["full"], "de", "linear"), whole) and len(calls) == 3  # per kind
    plain = {"de": de}
    tables.self_terms(plain, "de", "debiased"), tables.self_terms(plain, "de", "debiased")
    assert len(calls) == 5
    calls.clear()
    fresh = stored(tmp_path / "two", enc)
    run(fresh)
    assert len(calls) == sum(key[2] == "cka_self" for key in fresh._derived) > 0  # each kept term computed once for the whole analysis


def test_the_full_models_cka_with_the_reference_is_computed_once_for_the_permutation_test(tmp_path, monkeypatch):
    """`cka_reference_tables` (float64) keeps the full model's CKA of every language with the reference in the store;
    `cka_pvalue_table` reports those values bit for bit and does not compute them again (the subnetworks' and controls'
    it computes); from tensors in memory it computes them, to float64 rounding of the same (an independent `cka`)."""
    from xlsub.report import similarity_tables, tables
    from xlsub.similarity import permutation
    from xlsub.similarity.cka import cka

    enc = encodings()
    store = stored(tmp_path, enc)
    _, langs, reference_tables = tables.cka_reference_tables(store, LANGS, "en", "debiased")
    parallel = reference_tables["cka_vs_reference"]
    computed = []
    real = permutation.prepared_cka
    monkeypatch.setattr(permutation, "prepared_cka", lambda a, b, kind: computed.append(a["xc"].shape) or real(a, b, kind))
    counts = Counts(full=20, controls=20, subnetworks=10, length=10, power_draws=10)
    table = similarity_tables.cka_pvalue_table(store, LANGS, "en", "debiased", counts, 0)
    full = table.xs("full", level="model")
    for lang in ("de", "zh"):
        assert np.array_equal(full.xs(lang, level="language")["cka"].to_numpy(), parallel.loc[lang].to_numpy())
        assert tables.reference_cka(store["full"], "en", lang, "debiased") is not None
    layers = enc["full"]["en"].shape[0]
    assert computed and all(shape[0] != layers for shape in computed)  # none of the full model's all-layer pairs
    monkeypatch.setattr(permutation, "prepared_cka", real)
    plain = {k: {l: x.float() for l, x in v.items()} for k, v in enc.items()}
    again = similarity_tables.cka_pvalue_table(plain, LANGS, "en", "debiased", counts, 0).xs("full", level="model")
    for lang in ("de", "zh"):
        expected = [cka(plain["full"]["en"][l], plain["full"][lang][l], "debiased") for l in range(layers)]
        assert np.allclose(again.xs(lang, level="language")["cka"].to_numpy(), expected, rtol=1e-12, atol=0)
        assert np.allclose(full.xs(lang, level="language")["cka"].to_numpy(), expected, rtol=1e-12, atol=0)
    assert tables.reference_cka(plain["full"], "en", "de", "debiased") is None  # nothing kept for tensors in memory


def test_leave_block_out_self_terms_are_kept_by_the_store_and_computed_once_per_layer(tmp_path, monkeypatch):
    """`block_self_terms` equals `leave_block_out_self` of the stored layers; over a whole analysis a store computes
    each (model, language, layer) once, whichever of the pairs' interval, the reference's interval and the length
    control asks first; tensors in memory compute what is asked each time."""
    from xlsub.report import tables
    from xlsub.similarity.jackknife import jackknife_blocks, leave_block_out_self

    computed = []

    def counted(x, blocks, kind="debiased"):
        computed.append(x.shape[:-2].numel())
        return leave_block_out_self(x, blocks, kind)

    monkeypatch.setattr(tables, "leave_block_out_self", counted)
    enc = encodings()
    store = stored(tmp_path / "one", enc)
    de = enc["full"]["de"].float()
    labels = jackknife_blocks(de.shape[-2], 5)
    some = tables.block_self_terms(store["full"], "de", "debiased", labels, [0, -1])
    expected = leave_block_out_self(de[[0, de.shape[0] - 1]], labels, "debiased")
    assert torch.equal(some.kept, expected.kept) and torch.equal(some.whole, expected.whole) and computed == [2]
    every = tables.block_self_terms(store["full"], "de", "debiased", labels)  # the other layers only
    assert computed == [2, de.shape[0] - 2]
    assert torch.allclose(every.kept, leave_block_out_self(de, labels, "debiased").kept, rtol=1e-12, atol=0)
    assert torch.equal(every.kept[-1], some.kept[1])
    tables.block_self_terms(store["full"], "de", "debiased", jackknife_blocks(de.shape[-2], 4), [-1])  # other blocks
    assert computed[-1] == 1
    plain = {"de": de}
    tables.block_self_terms(plain, "de", "debiased", labels, [1]), tables.block_self_terms(plain, "de", "debiased", labels, [1])
    assert computed[-2:] == [1, 1]
    computed.clear()
    fresh = stored(tmp_path / "two", enc)
    run(fresh)
    kept = [key for key in fresh._derived if key[2] == "block_self"]
    assert sum(computed) == len(kept) > 0 and len(set(kept)) == len(kept)  # each (model, language, layer) once
    assert "full" in {key[0] for key in kept}
