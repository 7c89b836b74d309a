"""Prompt formats, tokenisation, image tags and batching of the VL1 and VL2 processors."""

import pytest
import torch

import vl
from vl.image_processing import VL2ImageProcessor, VLImageProcessor
from vl.processing import VL2ChatProcessor, VLChatProcessor, normalize_conversation

TILE = 56
CANDIDATES = ((56, 56), (56, 112), (112, 56), (112, 112))


@pytest.fixture(scope="module")
def vl1_proc(vlh, tmp_path_factory):
    tok = vlh.make_tokenizer(tmp_path_factory.mktemp("tok1"), vlh.VL1_SPECIALS)
    return VLChatProcessor(tok, VLImageProcessor(image_size=64, background=(127, 127, 127)), num_image_tokens=16)


@pytest.fixture(scope="module")
def vl2_proc(vlh, tmp_path_factory):
    tok = vlh.make_tokenizer(tmp_path_factory.mktemp("tok2"), vlh.VL2_SPECIALS)
    return VL2ChatProcessor(tok, VL2ImageProcessor(tile_size=TILE, candidate_resolutions=CANDIDATES))


def test_vl1_sft_format_golden(vl1_proc):
    conv = [
        {"role": "system", "content": "SYS"},
        {"role": "User", "content": "<image_placeholder>Describe."},
        {"role": "Assistant", "content": "A cat."},
        {"role": "User", "content": "Color?"},
        {"role": "Assistant", "content": ""},
    ]
    expected = (
        "SYS\n\nUser: <image_placeholder>Describe.\n\nAssistant: A cat.<｜end▁of▁sentence｜>User: Color?\n\nAssistant:"
    )
    assert vl1_proc.format(normalize_conversation(conv)) == expected
    # A conversation ending on a user turn gets the same open "Assistant:"; default system prompt.
    text = vl1_proc.format(normalize_conversation(conv[1:4]))
    assert text.startswith(vl.processing.VL1_SYSTEM_PROMPT + "\n\nUser: ") and text.endswith("Color?\n\nAssistant:")


def test_vl1_placeholder_expands_to_576_style_runs(vlh, vl1_proc):
    conv = [{"role": "user", "content": "<image_placeholder> and <image_placeholder> compared"}]
    batch = vl1_proc(conv, [vlh.noise_image(30, 20), vlh.noise_image(20, 30, seed=1)])
    ids = batch.input_ids[0]
    image_id = vl1_proc.tokenizer.convert_tokens_to_ids("<image_placeholder>")
    assert ids[0].item() == vl1_proc.tokenizer.bos_token_id
    assert int((ids == image_id).sum()) == 32 == int(batch.images_seq_mask.sum())
    assert batch.pixel_values.shape == (1, 2, 3, 64, 64)
    assert batch.images_emb_mask.shape == (1, 2, 16) and bool(batch.images_emb_mask.all())


def test_vl2_format_messages_v2(vlh, vl2_proc):
    tok = vl2_proc.tokenizer
    conv = [
        {"role": "<|User|>", "content": "<image>\nDescribe. "},
        {"role": "<|Assistant|>", "content": "A cat."},
        {"role": "<|User|>", "content": "Color?"},
        {"role": "<|Assistant|>", "content": ""},
    ]
    batch = vl2_proc(conv, [vlh.noise_image(100, 60)])
    ids = batch.input_ids[0].tolist()
    n_img = vl2_proc.image_processor.token_count((2, 2))
    image_id = tok.convert_tokens_to_ids("<image>")

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    expected = (
        [tok.bos_token_id]
        + enc("<|User|>: ")
        + [image_id] * n_img
        + enc("\nDescribe.\n\n<|Assistant|>:")
        + enc("A cat.")
        + [tok.eos_token_id]
        + enc("<|User|>: Color?\n\n<|Assistant|>:")
    )
    assert ids == expected  # per-message tokens, assistant without leading space, no trailing EOS
    assert batch.images_spatial_crop.tolist() == [[[2, 2]]]
    assert batch.pixel_values.shape == (1, 5, 3, TILE, TILE)


def test_vl2_system_message_is_its_own_segment_and_template_system_joins_the_first_turn(vlh, vl2_proc):
    tok = vl2_proc.tokenizer

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    turn = [{"role": "user", "content": "Hi"}]
    with_message = vl2_proc([{"role": "system", "content": " Be brief. "}] + turn).input_ids[0].tolist()
    assert with_message == [tok.bos_token_id] + enc("Be brief.") + enc("<|User|>: Hi\n\n<|Assistant|>:")
    templated = VL2ChatProcessor(tok, vl2_proc.image_processor, system_prompt="Be brief.")
    assert templated(turn).input_ids[0].tolist() == [tok.bos_token_id] + enc(
        "Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>:"
    )
    # An explicit system message replaces the template's system prompt rather than adding to it.
    assert templated([{"role": "system", "content": "Be brief."}] + turn).input_ids[0].tolist() == with_message


def test_vl2_image_tag_in_an_assistant_turn_is_an_error(vlh, vl2_proc):
    img = vlh.noise_image(56, 56)
    conv = [
        {"role": "user", "content": "<image> what is it?"},
        {"role": "assistant", "content": "It is <image>."},
        {"role": "user", "content": "Sure?"},
    ]
    with pytest.raises(vl.ImageTagMismatchError, match="assistant message cannot contain <image>"):
        vl2_proc(conv, [img, img])


def test_vl2_image_tag_in_a_system_message_is_an_error(vlh, vl2_proc):
    # The system message is encoded as plain text: its image would be dropped without a word.
    img = vlh.noise_image(56, 56)
    conv = [{"role": "system", "content": "Reference: <image>"}, {"role": "user", "content": "Describe it."}]
    with pytest.raises(vl.ImageTagMismatchError, match="system message cannot contain <image>"):
        vl2_proc(conv, [img])
    fixing = VL2ChatProcessor(vl2_proc.tokenizer, vl2_proc.image_processor, tag_policy="fix")
    with pytest.raises(vl.ImageTagMismatchError, match="system message cannot contain <image>"):
        fixing([conv[0], {"role": "user", "content": "<image> compare"}], [img, img])


def test_vl1_image_tag_in_a_system_message_is_an_image(vlh, vl1_proc):
    # VL1 tokenises the whole prompt string and expands every tag, as the reference does: nothing is dropped.
    conv = [{"role": "system", "content": "Reference: <image_placeholder>"}, {"role": "user", "content": "Describe."}]
    batch = vl1_proc(conv, [vlh.noise_image(30, 20)])
    assert int(batch.images_seq_mask.sum()) == 16 and bool(batch.images_emb_mask.all())


def test_vl2_more_than_two_images_are_not_tiled(vlh, vl2_proc):
    imgs = [vlh.noise_image(112, 112, seed=s) for s in range(3)]
    batch = vl2_proc([{"role": "user", "content": "<image><image><image> same?"}], imgs)
    assert batch.images_spatial_crop.tolist() == [[[1, 1]] * 3]
    assert batch.pixel_values.shape[1] == 6
    two = vl2_proc([{"role": "user", "content": "<image><image> same?"}], imgs[:2])
    assert two.images_spatial_crop.tolist() == [[[2, 2]] * 2]


def test_tag_count_mismatch_is_an_error_by_default(vlh, vl2_proc):
    img = vlh.noise_image(56, 56)
    with pytest.raises(vl.ImageTagMismatchError, match="1 <image> tags but 2 images"):
        vl2_proc([{"role": "user", "content": "<image> hi"}], [img, img])
    with pytest.raises(vl.ImageTagMismatchError, match="2 <image> tags but 1 images"):
        vl2_proc([{"role": "user", "content": "<image><image> hi"}], [img])
    with pytest.raises(vl.ImageTagMismatchError, match="1 <image> tags but 0 images"):
        vl2_proc([{"role": "user", "content": "<image> hi"}])


def test_tag_policy_fix_follows_the_web_demo(vlh, vl2_proc):
    img = vlh.noise_image(56, 56)
    fixing = VL2ChatProcessor(vl2_proc.tokenizer, vl2_proc.image_processor, tag_policy="fix")
    more_images = fixing([{"role": "user", "content": "hi"}], [img, img])
    reference = vl2_proc([{"role": "user", "content": "<image>\n<image>\nhi"}], [img, img])
    assert torch.equal(more_images.input_ids, reference.input_ids)
    fewer_images = fixing([{"role": "user", "content": "<image> a <image> b"}], [img])
    assert torch.equal(fewer_images.input_ids, vl2_proc([{"role": "user", "content": "<image> a  b"}], [img]).input_ids)


def test_bad_conversations(vl2_proc):
    for bad in (
        [],
        [{"content": "x"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}],
    ):
        with pytest.raises(ValueError):
            vl2_proc(bad)
    with pytest.raises(ValueError, match="2 conversations but 1 image lists"):
        vl2_proc([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], [[]])


def test_unreadable_image_is_a_clear_error(vl2_proc):
    with pytest.raises(vl.ImageLoadError, match="empty"):
        vl2_proc([{"role": "user", "content": "<image>"}], [b""])


def test_missing_special_token_is_reported(vlh, tmp_path):
    tok = vlh.make_tokenizer(tmp_path, [])
    with pytest.raises(ValueError, match="no '<image>' token"):
        VL2ChatProcessor(tok, VL2ImageProcessor())


def test_batch_is_left_padded(vlh, vl2_proc):
    convs = [
        [{"role": "user", "content": "<image> describe the image in detail please"}],
        [{"role": "user", "content": "hi"}],
    ]
    batch = vl2_proc(convs, [[vlh.noise_image(100, 60)], []])
    single = [vl2_proc(c, i) for c, i in zip(convs, [[vlh.noise_image(100, 60)], []])]
    length = batch.input_ids.shape[1]
    for i, s in enumerate(single):
        n = s.input_ids.shape[1]
        assert torch.equal(batch.input_ids[i, length - n :], s.input_ids[0])
        assert batch.attention_mask[i].tolist() == [0] * (length - n) + [1] * n
        assert (batch.input_ids[i, : length - n] == vl2_proc.pad_id).all()
    assert batch.images_spatial_crop.tolist() == [[[2, 2]], [[0, 0]]]
    assert batch.pixel_values.shape == (2, 5, 3, TILE, TILE) and not batch.pixel_values[1].any()
    text_only = vl2_proc([{"role": "user", "content": "hi"}])
    assert text_only.images_spatial_crop.tolist() == [[[0, 0]]] and not text_only.images_seq_mask.any()
