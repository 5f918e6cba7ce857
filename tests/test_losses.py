"""The multi-positive contrastive loss (data.caption_positives) against plain InfoNCE and by hand."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from data_pipelines.loader import caption_key, caption_keys
from limoe.losses import CaptionPositivesLoss, LIMoELoss, positives_mask


def features(n, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g), dim=-1),
            F.normalize(torch.randn(n, dim, generator=g), dim=-1), torch.tensor(10.0))


def test_with_no_shared_caption_it_is_open_clips_loss():
    image, text, scale = features(6)
    keys = caption_keys([f"cap {i}" for i in range(6)], [[f"cap {i}", f"other {i}"] for i in range(6)])
    assert torch.equal(positives_mask(keys, keys[:, 0]), torch.eye(6, dtype=torch.bool))
    torch.testing.assert_close(CaptionPositivesLoss()(image, text, scale, keys), ClipLoss()(image, text, scale))


def test_a_shared_caption_is_a_positive_of_every_image_that_has_it():
    image, text, scale = features(4)
    # Text 0 is "cls", a caption samples 0, 1 and 3 all have; texts 1-3 are each sample's own.
    drawn = ["cls", "own 1", "own 2", "own 3"]
    options = [["own 0", "cls"], ["own 1", "cls"], ["own 2"], ["cls", "own 3"]]
    keys = caption_keys(drawn, options)
    logits = scale * image @ text.T
    log_p_image, log_p_text = F.log_softmax(logits, dim=1), F.log_softmax(logits.T, dim=1)
    image_positives = [[0], [0, 1], [2], [0, 3]]  # image i: the texts it has
    text_positives = [[0, 1, 3], [1], [2], [3]]  # text j: the images that have it
    want = (torch.stack([-log_p_image[i, js].mean() for i, js in enumerate(image_positives)]).mean()
            + torch.stack([-log_p_text[j, is_].mean() for j, is_ in enumerate(text_positives)]).mean()) / 2
    got = LIMoELoss("clip")({"image_features": image, "text_features": text, "logit_scale": scale,
                             "aux_loss": torch.tensor(0.5)}, keys)
    torch.testing.assert_close(got["contrastive_loss"], want)
    torch.testing.assert_close(got["loss"], want + 0.5)
    assert not torch.allclose(want, ClipLoss()(image, text, scale))


def test_text_mode_spreads_the_captions_targets_and_keeps_each_images_on_its_own_caption():
    image, text, scale = features(4, seed=1)
    drawn = ["cls", "own 1", "own 2", "own 3"]
    options = [["own 0", "cls"], ["own 1", "cls"], ["own 2"], ["cls", "own 3"]]
    keys = caption_keys(drawn, options)
    logits = scale * image @ text.T
    # Image 1 has "cls" (text 0) besides its own caption; image 3's own caption is text 3 and it
    # has "cls" too: those leave the images' softmax; nothing else changes on the image side.
    masked = logits.clone()
    masked[1, 0] = masked[3, 0] = float("-inf")
    image_loss = F.cross_entropy(masked, torch.arange(4))
    log_p_text = F.log_softmax(logits.T, dim=1)
    text_loss = torch.stack([-log_p_text[j, is_].mean() for j, is_ in enumerate([[0, 1, 3], [1], [2], [3]])]).mean()
    got = LIMoELoss("clip", positives="text")({"image_features": image, "text_features": text,
                                               "logit_scale": scale, "aux_loss": torch.tensor(0.0)}, keys)
    torch.testing.assert_close(got["contrastive_loss"], (image_loss + text_loss) / 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        CaptionPositivesLoss(mode="images")


def test_keys_put_the_drawn_caption_first_and_pad_with_zeros():
    keys = caption_keys(["b"], [["a", "b", "a"]], width=4)
    assert keys.tolist() == [[caption_key("b"), caption_key("a"), 0, 0]]
    many = caption_keys(["z"], [[f"c{i}" for i in range(30)] + ["z"]], width=4)
    # "z" is kept although it comes past the width: the diagonal stays positive.
    assert many[0].tolist() == [caption_key(c) for c in ("z", "c0", "c1", "c2")]
    assert all(caption_key(f"c{i}") != 0 for i in range(1000))


def test_the_sigmoid_loss_refuses_caption_keys():
    image, text, scale = features(2)
    keys = caption_keys(["a", "b"], [["a"], ["b"]])
    out = {"image_features": image, "text_features": text, "logit_scale": scale,
           "logit_bias": torch.tensor(-10.0), "aux_loss": torch.tensor(0.0)}
    with pytest.raises(ValueError, match="softmax loss"):
        LIMoELoss("siglip")(out, keys)
