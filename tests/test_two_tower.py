"""The dense two-tower peer (open_clip's CLIP behind limoe's model interface) and open_clip's
BPE tokenizer with limoe's calling convention."""
import pickle

import pytest
import torch

import limoe
from limoe.flops import count_parameters, flops_per_pair
from limoe.losses import LIMoELoss
from limoe.two_tower import TwoTowerCLIP

TINY = dict(width=32, depth=2, heads=2, mlp_dim=64, embed_dim=16, image_size=16, patch_size=4, context_length=8)


@pytest.fixture(scope="module")
def bpe():
    return limoe.BPETokenizer(context_length=8)


def test_bpe_ids_are_open_clips_shifted_by_one_so_zero_is_only_padding(bpe):
    """open_clip pads with 0, which is also a token of its vocabulary; limoe's models read 0 as padding."""
    from open_clip.tokenizer import SimpleTokenizer

    tokens = bpe(["red heart!"])[0]
    open_clip_ids = SimpleTokenizer(context_length=8)(["red heart!"])[0]
    n = 5  # start, red, heart, !, end
    assert torch.equal(tokens[:n], open_clip_ids[:n] + 1)
    assert (tokens[n:] == 0).all() and tokens[n - 1] == bpe.eos_id == bpe.vocab_size - 1


def test_bpe_truncates_and_keeps_the_end_token(bpe):
    tokens, dropped = bpe.encode_with_truncation(["one two three four five six seven eight nine"])
    assert tokens[0, -1] == bpe.eos_id and dropped == [3]


def test_bpe_tokenizer_saves_loads_and_pickles(tmp_path, bpe):
    path = bpe.save(tmp_path / "tokenizer.bpe.json")
    again = limoe.load_tokenizer(tmp_path)
    assert torch.equal(again(["grinning face"]), bpe(["grinning face"])) and again.context_length == 8
    assert torch.equal(pickle.loads(pickle.dumps(bpe))(["cat"]), bpe(["cat"]))
    vocab = tmp_path / limoe.BPETokenizer.VOCAB_FILENAME
    vocab.write_bytes(vocab.read_bytes()[:-10])
    with pytest.raises(ValueError, match="SHA-256"):
        limoe.BPETokenizer.load(path)


def test_peer_has_limoes_width_depth_and_flops_but_two_towers():
    peer, sparse = limoe.get_config("open_clip-nano"), limoe.get_config("limoe-nano")
    assert (peer.width, peer.depth, peer.heads, peer.mlp_dim) == (sparse.width, sparse.depth, sparse.heads,
                                                                   sparse.mlp_dim)
    peer_flops, sparse_flops = flops_per_pair(peer)["total"], flops_per_pair(sparse)["total"]
    assert abs(peer_flops - sparse_flops) / sparse_flops < 0.02  # the class token and heads differ a little
    params = count_parameters(limoe.create_model(peer))["total"]
    assert 7.5e6 < params < 8.5e6  # most of it the 49k-token embedding, as open_clip's own


def test_peer_trains_like_a_limoe_and_exports_round_trip(tmp_path, bpe):
    torch.manual_seed(0)
    model = limoe.create_model("open_clip-nano", **TINY, vocab_size=bpe.vocab_size)
    assert isinstance(model, TwoTowerCLIP) and model.moe_layers() == []
    images, tokens = torch.randn(4, 3, 16, 16), bpe(["red heart", "cat", "grinning face", "a dog"])
    out = model.train()(images, tokens)
    loss = LIMoELoss()(out)["loss"]
    loss.backward()
    assert out["aux_loss"].item() == 0 and model.clip.visual.conv1.weight.grad is not None
    limoe.save(model, bpe, tmp_path / "export")
    loaded, _, tok = limoe.load(tmp_path / "export")
    model.eval()
    assert isinstance(loaded, TwoTowerCLIP)
    torch.testing.assert_close(loaded.encode_text(tok(["cat"]), normalize=True),
                               model.encode_text(bpe(["cat"]), normalize=True))
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))


def test_peer_with_a_sentencepiece_tokenizer_pools_at_its_end_token(tiny_tokenizer):
    model = limoe.create_model("open_clip-nano", **TINY, vocab_size=tiny_tokenizer.vocab_size,
                               text_pool="eos", eos_id=tiny_tokenizer.eos_id).eval()
    tokens = tiny_tokenizer(["red heart", "red heart blue sun moon"])
    short = tokens[:1].clone()
    with torch.no_grad():  # the end token's features: padding after it (causal attention) changes nothing
        padded_more = model.encode_text(short)
        short[0, -1] = 0
        assert torch.equal(model.encode_text(short), padded_more)


def test_logit_scale_is_clamped():
    model = limoe.create_model("open_clip-nano", **TINY, logit_scale_init=6.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
