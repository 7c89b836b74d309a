"""End to end on CPU: a random-weight model with DeepSeek-VL2-Tiny's structure chats about a 1024x768
image file (issue point 5).

Structure kept from VL2-Tiny: 384 tiles, SigLIP patch 14 with tanh GELU and a 27x27 grid, the 23
released candidate resolutions, the 2x2 projector, MHA (no MLA), dense layer 0 then DeepSeekMoE with
64 routed experts (top-6) and 2 shared experts. Widths and depths are reduced to fit the test budget.
"""

import pytest
import torch

import vl
from vl.image_processing import CANDIDATE_RESOLUTIONS

TINY_STRUCTURE_LM = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    moe_intermediate_size=32,
)
TINY_STRUCTURE_VISION = dict(
    model_name="siglip_so400m_patch14_384", image_size=384, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=3.7362
)


@pytest.mark.slow
def test_chat_about_a_1024x768_image(vlh, tmp_path):
    path = vlh.write_vl2_checkpoint(
        tmp_path / "ckpt",
        seed=11,
        language_overrides=TINY_STRUCTURE_LM,
        vision=TINY_STRUCTURE_VISION,
        candidates=[list(c) for c in CANDIDATE_RESOLUTIONS],
    )
    image_file = tmp_path / "photo.jpg"
    vlh.noise_image(1024, 768, seed=3).save(image_file, quality=90)
    model, processor = vl.load(path)
    conversation = [{"role": "user", "content": "<image>\n<|grounding|>Describe the image."}]

    batch = processor(conversation, [str(image_file)])
    assert int(batch.images_seq_mask.sum()) == vl.image_token_count((1024, 768)) == 1415
    assert batch.images_spatial_crop.tolist() == [[[3, 2]]] and batch.pixel_values.shape == (1, 7, 3, 384, 384)

    torch.manual_seed(0)
    pieces = list(vl.chat(model, processor, conversation, [str(image_file)], max_new_tokens=12))
    assert pieces and all(isinstance(p, str) for p in pieces)
    reply = vl.chat(model, processor, conversation, [str(image_file)], stream=False, max_new_tokens=12)
    assert "".join(pieces) == reply
    ids = model.generate(processor(conversation, [str(image_file)]), max_new_tokens=12, eos_token_id=processor.eos_id)
    ids = ids[0].tolist()
    answer = ids[: ids.index(processor.eos_id)] if processor.eos_id in ids else ids
    assert answer, "the random model should say something before EOS with this seed"
    assert processor.tokenizer.decode(answer, skip_special_tokens=False) == reply
    chunked = vl.chat(
        model, processor, conversation, [str(image_file)], stream=False, max_new_tokens=12, prefill_chunk_size=512
    )
    assert chunked == reply
