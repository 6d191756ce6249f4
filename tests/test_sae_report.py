"""`pico-llm sae report`: the page renders with its image, a section per feature with its contexts, the
shading follows the feature's activation, the token effects go through the right weights; bad input is
one line and exit 2."""

import json
import re

import numpy as np
import pytest
import torch
from test_experiments import assert_self_contained, render_in_chromium  # the headless-chromium helpers

from picollm import checkpoint as ckpt
from picollm.analysis import sae_report
from picollm.analysis.sae import SAEConfig, SparseAutoencoder, save_sae
from picollm.cli import main
from picollm.config import DataConfig, ModelConfig, TrainConfig
from picollm.data.corpus import build_corpus
from picollm.models.hooks import run_with_cache
from picollm.training import train

METRICS = {"l0": 4.0, "explained_variance": 0.61, "ce_loss_recovered": 0.83, "kl_div": 0.12,
           "dead_fraction": 0.0, "dense_fraction": 0.03}
MLP_SITE = "blocks.0.mlp.hook_post"
TOK = (r'<span class="tok[^"]*" style="background: rgba\(234, 88, 12, ([\d.]+)\)" title="[^"]*">'
       r'((?:<span class="esc">[^<]*</span>|[^<])*)</span>')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained byte-level transformer with RoPE (so hook_embed is the token embedding alone)."""
    root = tmp_path_factory.mktemp("sae_report")
    data = DataConfig(dataset="numbers", numbers_count=150, tokenizer="byte", seed=1)
    tcfg = TrainConfig(epochs=1, max_steps_per_epoch=8, batch_size=8, warmup_steps=2, eval_batches=2,
                       log_interval=4, prompt="0 1 2", max_new_tokens=4)
    mcfg = ModelConfig(model="transformer", block_size=24, n_embd=32, n_layer=1, n_head=2, pos_emb="rope",
                       tie_weights=False)
    train(mcfg, data, tcfg, str(root / "run"), progress=False, log=lambda s: None)
    return str(root / "run")


def sections(page: str) -> dict[int, str]:
    return {int(f): body for f, body in re.findall(r'<section class="feature" id="feature-(\d+)">(.*?)</section>',
                                                   page, re.S)}


def contexts(section: str) -> list[list[tuple[float, str]]]:
    """Each context of a feature's section as [(shading alpha, token html)]."""
    return [[(float(a), t) for a, t in re.findall(TOK, ctx)]
            for ctx in re.findall(r'<div class="ctx">(.*?)</div>', section, re.S)]


def random_sae(run, out, site=MLP_SITE, features=64):
    """Random unit directions, centred on the site's mean activation (as training starts b_dec) so that
    features split the tokens between them."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(run=run, site=site, d_in=96, features=features, kind="topk", k=4))
    if ckpt.is_run(run):
        model, tok, (_, dcfg, _) = ckpt.load_run(run)
        x = torch.from_numpy(np.asarray(build_corpus(dcfg, tokenizer=tok, progress=False).sources[0].test.tokens[:240],
                                        dtype=np.int64)).view(10, 24)
        with torch.no_grad():
            sae.b_dec.copy_(run_with_cache(model, x, [site])[1][site].mean(dim=(0, 1)))
    save_sae(sae, str(out), metrics=METRICS)
    return sae


def test_page_renders_with_a_section_per_feature(run, tmp_path, capsys):
    d = tmp_path / "sae"
    random_sae(run, d)
    assert main(["sae", "report", str(d), "--features", "5", "--contexts", "3"]) == 0
    page_path = d / "report.html"
    assert capsys.readouterr().out.strip() == f"wrote {page_path}"
    page = page_path.read_text()
    assert_self_contained(page)
    for text in ("explained_variance", "of the loss increase from zero-ablating", "0.83", MLP_SITE, "blocks.0.mlp.proj",
                 "no final norm"):
        assert text in page, text
    secs = sections(page)
    assert len(secs) == 5
    for body in secs.values():
        ctxs = contexts(body)
        assert len(ctxs) == 3 and all(1 <= len(c) <= sae_report.BEFORE + sae_report.AFTER + 1 for c in ctxs)
        assert all(max(a for a, _ in c) > 0 for c in ctxs)  # the peak is shaded
        assert "<b>promotes</b>" in body and "<b>suppresses</b>" in body
    loaded, total, _ = render_in_chromium(str(page_path), tmp_path)
    assert total == 1 and loaded == 1  # the density histogram


def one_token_sae(run, out):
    """An SAE on hook_embed whose feature 0 fires exactly on one digit token t (every other feature dead):
    its encoder column solves E c = e_t over the embeddings E of the tokens in the test split. Returns t."""
    model, tok, (_, dcfg, _) = ckpt.load_run(run)
    toks = np.asarray(build_corpus(dcfg, tokenizer=tok, progress=False).sources[0].test.tokens)
    present, counts = np.unique(toks, return_counts=True)
    digits = [(c, int(i)) for i, c in zip(present, counts) if tok.decode([int(i)]).isdigit()]
    t = min(digits)[1]  # the rarest digit: far from dense
    E = model.get_input_embeddings().detach()[torch.from_numpy(present.astype(np.int64))]  # (P, C)
    e_t = torch.from_numpy((present == t).astype(np.float32))
    c = torch.linalg.pinv(E) @ e_t  # (C,)
    assert torch.allclose(E @ c, e_t, atol=1e-3)
    sae = SparseAutoencoder(SAEConfig(run=run, site="hook_embed", d_in=E.size(1), features=8, kind="l1", l1=1e-3))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = 10 * c
        sae.b_enc.fill_(-100.0)
        sae.b_enc[0] = -5.0  # activation 5 on t, below zero elsewhere
        sae.b_dec.zero_()
    save_sae(sae, str(out), metrics=METRICS)
    return t, tok.decode([t])


def test_shading_follows_the_feature(run, tmp_path, capsys):
    d = tmp_path / "one"
    t, text = one_token_sae(run, d)
    out = tmp_path / "page.html"
    assert main(["sae", "report", str(d), "--out", str(out), "--contexts", "4"]) == 0
    page = out.read_text()
    secs = sections(page)
    assert list(secs) == [0]  # the others never fire
    ctxs = contexts(secs[0])
    assert len(ctxs) == 4
    for ctx in ctxs:
        assert max(ctx)[1] == text  # the most shaded token is t
        assert all((a > 0) == (tok == text) for a, tok in ctx), (t, ctx)  # shaded exactly where t is
        assert any(tok != text for _, tok in ctx)  # and there is something else to not shade
    assert "7 dead" in page  # features 1..7, counted apart


def test_token_effects_go_through_the_head(run):
    model, _, _ = ckpt.load_run(run)
    head = model.get_output_embeddings().detach()  # (V, C)
    u = int(head.norm(dim=1).argmax())  # u . u >= u . v for every v: u's own row promotes u most
    w = torch.randn(8, head.size(1))
    w[0] = head[u] / head[u].norm()
    logits, note = sae_report.token_effects(model, "blocks.0.hook_resid_post", w)
    assert int(logits[0].argmax()) == u and "no final norm" in note
    proj = model.blocks[0].mlp.proj.weight.detach()  # (C, H): a hidden-space row reaches the head through it
    w = torch.randn(8, proj.size(1))
    w[0] = torch.linalg.pinv(proj) @ head[u]
    logits, note = sae_report.token_effects(model, MLP_SITE, w)
    assert int(logits[0].argmax()) == u and "blocks.0.mlp.proj" in note
    assert sae_report.token_effects(model, "blocks.0.attn.hook_q", w)[0] is None


@pytest.mark.parametrize("make", ["missing", "corrupt", "features0", "no_run"])
def test_bad_input_exits_2_with_one_line(run, tmp_path, capsys, make):
    d = tmp_path / "sae"
    args = []
    if make == "corrupt":
        random_sae(run, d)
        (d / "config.json").write_text("{not json")
    elif make == "features0":
        random_sae(run, d)
        args = ["--features", "0"]
    elif make == "no_run":
        random_sae(str(tmp_path / "gone"), d)
    assert main(["sae", "report", str(d), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    expect = {"missing": "does not exist", "corrupt": "corrupt", "features0": "--features", "no_run": "gone"}[make]
    assert expect in err, err
    assert not (d / "report.html").exists()


def test_config_is_shown(run, tmp_path, capsys):
    d = tmp_path / "sae"
    random_sae(run, d)
    page = sae_report.render_page(str(d), features=2, contexts=1, tokens=200)
    cfg = json.loads((d / "config.json").read_text())
    assert f"<code>{cfg['site']}</code>" in page and "topk" in page
    assert re.search(r"over 2\d\d test tokens", page)  # --tokens bounds the scan (whole windows)
